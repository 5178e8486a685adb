//! A small PNG line chart for specbench: measured speed-up and its bound against the
//! draft length k, with the adaptive policy and plain decoding as horizontal lines.
//! Drawn on an RGB canvas with a built-in 5x7 font, so no font files are needed.

use std::path::Path;

use anyhow::{Context, Result};

pub type Rgb = [u8; 3];

pub const BLUE: Rgb = [31, 119, 180];
pub const ORANGE: Rgb = [255, 127, 14];
pub const GREEN: Rgb = [44, 160, 44];
pub const GREY: Rgb = [150, 150, 150];
const BLACK: Rgb = [0, 0, 0];
const LIGHT: Rgb = [230, 230, 230];

/// One series over k = 1..; `dots` draws markers at the points.
pub struct Series {
    pub label: String,
    pub color: Rgb,
    pub points: Vec<(f64, f64)>,
    pub dots: bool,
}

/// A horizontal reference line (plain decoding, adaptive policy).
pub struct HLine {
    pub label: String,
    pub color: Rgb,
    pub y: f64,
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A line `thick` pixels wide (Bresenham with a square brush); `dash` > 0 leaves gaps.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb, thick: i64, dash: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err, mut n) = (x0, y0, dx + dy, 0i64);
        loop {
            if dash == 0 || (n / dash) % 2 == 0 {
                for ox in 0..thick {
                    for oy in 0..thick {
                        self.set(x + ox - thick / 2, y + oy - thick / 2, c);
                    }
                }
            }
            n += 1;
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn dot(&mut self, (cx, cy): (i64, i64), r: i64, c: Rgb) {
        for y in -r..=r {
            for x in -r..=r {
                if x * x + y * y <= r * r {
                    self.set(cx + x, cy + y, c);
                }
            }
        }
    }

    /// Text at (x, y) = top left, each font pixel drawn as a `scale` square.
    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb, scale: i64) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (ry, row) in rows.iter().enumerate() {
                for rx in 0..5 {
                    if row & (0b10000 >> rx) != 0 {
                        for a in 0..scale {
                            for b in 0..scale {
                                self.set(
                                    x + (i as i64 * 6 + rx) * scale + a,
                                    y + ry as i64 * scale + b,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    fn save(&self, path: &Path) -> Result<()> {
        let file =
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
        let mut enc =
            png::Encoder::new(std::io::BufWriter::new(file), self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()?.write_image_data(&self.px)?;
        Ok(())
    }
}

fn text_width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 6 * scale
}

/// Draws the chart and writes it to `path`.
pub fn chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    hlines: &[HLine],
) -> Result<()> {
    let (w, h) = (900i64, 560i64);
    let (left, right, top, bottom) = (90i64, 220i64, 60i64, 70i64);
    let mut cv = Canvas::new(w as usize, h as usize);
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x_min, x_max) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let ys = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(hlines.iter().map(|l| l.y));
    let y_max = ys.fold(1.0f64, f64::max);
    let y_top = (y_max * 1.15 * 2.0).ceil() / 2.0;
    let (x_min, x_max) = if x_min < x_max {
        (x_min, x_max)
    } else {
        (0.0, 1.0)
    };
    let px =
        |x: f64| left + ((x - x_min) / (x_max - x_min) * (w - left - right) as f64).round() as i64;
    let py = |y: f64| h - bottom - (y / y_top * (h - top - bottom) as f64).round() as i64;

    // Grid, axes and tick labels.
    let y_step = if y_top > 4.0 { 1.0 } else { 0.5 };
    let mut y = 0.0;
    while y <= y_top + 1e-9 {
        cv.line((left, py(y)), (w - right, py(y)), LIGHT, 1, 0);
        let t = format!("{y:.1}");
        cv.text(left - 12 - text_width(&t, 2), py(y) - 7, &t, BLACK, 2);
        y += y_step;
    }
    let mut x = x_min.ceil();
    while x <= x_max + 1e-9 {
        cv.line((px(x), top), (px(x), h - bottom), LIGHT, 1, 0);
        let t = format!("{x:.0}");
        cv.text(px(x) - text_width(&t, 2) / 2, h - bottom + 10, &t, BLACK, 2);
        x += 1.0;
    }
    cv.line((left, h - bottom), (w - right, h - bottom), BLACK, 2, 0);
    cv.line((left, top), (left, h - bottom), BLACK, 2, 0);
    cv.text(
        (w - right + left) / 2 - text_width(title, 3) / 2,
        15,
        title,
        BLACK,
        3,
    );
    cv.text(
        (w - right + left) / 2 - text_width(x_label, 2) / 2,
        h - 30,
        x_label,
        BLACK,
        2,
    );
    cv.text(10, top - 30, y_label, BLACK, 2);

    for l in hlines {
        cv.line((left, py(l.y)), (w - right, py(l.y)), l.color, 2, 8);
    }
    for s in series {
        for pair in s.points.windows(2) {
            cv.line(
                (px(pair[0].0), py(pair[0].1)),
                (px(pair[1].0), py(pair[1].1)),
                s.color,
                3,
                0,
            );
        }
        if s.dots {
            for p in &s.points {
                cv.dot((px(p.0), py(p.1)), 6, s.color);
            }
        }
    }

    // Legend.
    let mut ly = top + 10;
    let lx = w - right + 20;
    for (label, color, dashed) in series
        .iter()
        .map(|s| (&s.label, s.color, false))
        .chain(hlines.iter().map(|l| (&l.label, l.color, true)))
    {
        cv.line(
            (lx, ly + 7),
            (lx + 30, ly + 7),
            color,
            3,
            if dashed { 6 } else { 0 },
        );
        cv.text(lx + 38, ly, label, BLACK, 2);
        ly += 28;
    }
    cv.save(path)
}

/// 5x7 glyphs, one byte per row (bit 4 = leftmost). Unknown characters are blank.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        '/' => [1, 1, 2, 4, 8, 16, 16],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '*' => [0, 4, 21, 14, 21, 4, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        ',' => [0, 0, 0, 0, 12, 4, 8],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        'a' => [0, 0, 14, 1, 15, 17, 15],
        'b' => [16, 16, 22, 25, 17, 17, 30],
        'c' => [0, 0, 14, 16, 16, 17, 14],
        'd' => [1, 1, 13, 19, 17, 17, 15],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        'f' => [6, 9, 8, 28, 8, 8, 8],
        'g' => [0, 15, 17, 17, 15, 1, 14],
        'h' => [16, 16, 22, 25, 17, 17, 17],
        'i' => [4, 0, 12, 4, 4, 4, 14],
        'j' => [2, 0, 6, 2, 2, 18, 12],
        'k' => [16, 16, 18, 20, 24, 20, 18],
        'l' => [12, 4, 4, 4, 4, 4, 14],
        'm' => [0, 0, 26, 21, 21, 17, 17],
        'n' => [0, 0, 22, 25, 17, 17, 17],
        'o' => [0, 0, 14, 17, 17, 17, 14],
        'p' => [0, 0, 30, 17, 30, 16, 16],
        'q' => [0, 0, 13, 19, 15, 1, 1],
        'r' => [0, 0, 22, 25, 16, 16, 16],
        's' => [0, 0, 14, 16, 14, 1, 30],
        't' => [8, 8, 28, 8, 8, 9, 6],
        'u' => [0, 0, 17, 17, 17, 19, 13],
        'v' => [0, 0, 17, 17, 17, 10, 4],
        'w' => [0, 0, 17, 17, 21, 21, 10],
        'x' => [0, 0, 17, 10, 4, 10, 17],
        'y' => [0, 0, 17, 17, 15, 1, 14],
        'z' => [0, 0, 31, 2, 4, 8, 31],
        _ => [0; 7],
    }
}
