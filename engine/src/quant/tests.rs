#![allow(clippy::unwrap_used)]

use super::*;

/// Deterministic values of mixed sign and magnitude, with some exact zeros.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if i % 17 == 5 {
                0.0
            } else {
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * (1.0 + (i % 7) as f32)
            }
        })
        .collect()
}

fn int4(group: usize) -> Quant {
    Quant::Int4 { group }
}

#[test]
fn formats_parse_and_print_alike() {
    for f in [
        WeightFormat::Checkpoint,
        WeightFormat::Int8,
        WeightFormat::INT4,
        WeightFormat::Int4 { group: 128 },
    ] {
        assert_eq!(f.to_string().parse::<WeightFormat>(), Ok(f));
    }
    assert_eq!("INT4".parse::<WeightFormat>(), Ok(WeightFormat::INT4));
    assert_eq!(WeightFormat::INT4.to_string(), "int4:g64");
}

#[test]
fn bad_formats_are_refused_with_what_was_wrong() {
    for text in ["int3", "int4:64", "int4:gx", "fp8", ""] {
        assert_eq!(
            text.parse::<WeightFormat>(),
            Err(QuantError::UnknownFormat {
                text: text.to_string()
            })
        );
    }
    for group in [0, 8, 24, 8192] {
        assert_eq!(
            format!("int4:g{group}").parse::<WeightFormat>(),
            Err(QuantError::GroupSize { group })
        );
    }
}

/// Each value is within half a step of its scale, the largest of each row (int8) or
/// group (int4) is exact up to rounding of the scale, and zeros stay zero.
#[test]
fn rounding_error_is_at_most_half_a_step() {
    let (rows, cols) = (9, 200);
    let w = values(rows * cols, 1);
    for (quant, levels, span) in [
        (Quant::Int8, 127.0f32, cols),
        (int4(16), 7.0, 16),
        (int4(64), 7.0, 64),
    ] {
        let m = QuantMatrix::quantize(&w, rows, cols, quant).unwrap();
        let d = m.dequantize();
        for r in 0..rows {
            for (g, chunk) in w[r * cols..(r + 1) * cols].chunks(span).enumerate() {
                let amax = chunk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let step = amax / levels;
                for (j, &v) in chunk.iter().enumerate() {
                    let got = d[r * cols + g * span + j];
                    assert!(
                        (got - v).abs() <= step * 0.5 * (1.0 + 1e-5),
                        "{quant:?} [{r}, {}]: {v} -> {got}, step {step}",
                        g * span + j
                    );
                    if v == 0.0 {
                        assert_eq!(got, 0.0);
                    }
                }
            }
        }
    }
}

/// The packing is the documented one: `q + 8` in nibbles, the even column low, each
/// row starting on a byte (odd widths leave the last high nibble empty).
#[test]
fn int4_packing_is_the_documented_layout() {
    // One group of 16 in the row.
    let row0: Vec<f32> = (0..16).map(|c| (c as f32) - 7.0).collect(); // -7..=8: scale 8/7
    let m = QuantMatrix::quantize(&row0, 1, 16, int4(16)).unwrap();
    let QuantData::Int4 { packed, scales, .. } = m.data() else {
        panic!("not int4")
    };
    assert_eq!(scales, &[8.0 / 7.0]);
    let got: Vec<i8> = (0..16).map(|c| int4_at(packed, c)).collect();
    let want: Vec<i8> = row0
        .iter()
        .map(|v| (v / (8.0 / 7.0)).round() as i8)
        .collect();
    assert_eq!(got, want);
    assert_eq!(packed[0] & 0xf, (want[0] + 8) as u8);
    assert_eq!(packed[0] >> 4, (want[1] + 8) as u8);

    let odd = values(3 * 5, 2);
    let m = QuantMatrix::quantize(&odd, 3, 5, int4(16)).unwrap();
    let QuantData::Int4 { packed, .. } = m.data() else {
        panic!("not int4")
    };
    assert_eq!(packed.len(), 3 * 3);
    for r in 0..3 {
        assert_eq!(packed[r * 3 + 2] >> 4, 0, "row {r}'s spare nibble");
    }
}

/// A short last group gets a scale of its own.
#[test]
fn a_short_last_group_has_its_own_scale() {
    let mut w = vec![1.0f32; 20];
    // The last group (columns 16..20) holds only small values.
    w[16..].copy_from_slice(&[-0.07, 0.01, 0.0, 0.07]);
    let m = QuantMatrix::quantize(&w, 1, 20, int4(16)).unwrap();
    let QuantData::Int4 { scales, .. } = m.data() else {
        panic!("not int4")
    };
    assert_eq!(scales.len(), 2);
    let d = m.dequantize();
    assert!(
        (d[19] - 0.07).abs() < 1e-6 && (d[16] + 0.07).abs() < 1e-6,
        "{d:?}"
    );
    assert!((d[17] - 0.01).abs() <= 0.005, "{d:?}");
}

#[test]
fn bytes_are_integers_plus_f32_scales() {
    let (rows, cols) = (6, 130);
    let w = values(rows * cols, 3);
    let int8 = QuantMatrix::quantize(&w, rows, cols, Quant::Int8).unwrap();
    assert_eq!(int8.bytes(), rows * cols + 4 * rows);
    let g64 = QuantMatrix::quantize(&w, rows, cols, int4(64)).unwrap();
    assert_eq!(g64.bytes(), rows * 65 + 4 * rows * 3);
    assert_eq!(int8.format(), WeightFormat::Int8);
    assert_eq!(g64.format(), WeightFormat::Int4 { group: 64 });
}

#[test]
fn zero_rows_and_groups_quantize_to_zero() {
    let w = vec![0.0f32; 2 * 32];
    for quant in [Quant::Int8, int4(16)] {
        let m = QuantMatrix::quantize(&w, 2, 32, quant).unwrap();
        assert!(m.dequantize().iter().all(|&v| v == 0.0));
    }
}

#[test]
fn non_finite_weights_and_bad_shapes_are_refused() {
    let mut w = values(4 * 8, 4);
    w[2 * 8 + 3] = f32::NAN;
    let e = QuantMatrix::quantize(&w, 4, 8, Quant::Int8).unwrap_err();
    assert!(
        matches!(e, QuantError::NonFinite { row: 2, col: 3, .. }),
        "{e:?}"
    );
    w[2 * 8 + 3] = f32::INFINITY;
    let e = QuantMatrix::quantize(&w, 4, 8, int4(16)).unwrap_err();
    assert!(
        matches!(e, QuantError::NonFinite { row: 2, col: 3, .. }),
        "{e:?}"
    );
    assert_eq!(
        QuantMatrix::quantize(&w, 5, 8, Quant::Int8),
        Err(QuantError::Shape {
            len: 32,
            rows: 5,
            cols: 8
        })
    );
    assert_eq!(
        QuantMatrix::quantize(&values(32, 5), 4, 8, int4(10)),
        Err(QuantError::GroupSize { group: 10 })
    );
}

#[test]
fn a_row_dequantizes_as_the_whole_matrix_does() {
    let (rows, cols) = (5, 96);
    let w = values(rows * cols, 6);
    for quant in [Quant::Int8, int4(32)] {
        let m = QuantMatrix::quantize(&w, rows, cols, quant).unwrap();
        let all = m.dequantize();
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            m.dequantize_row(r, &mut row);
            assert_eq!(row, all[r * cols..(r + 1) * cols]);
        }
    }
}
