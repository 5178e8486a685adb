//! Progress of a weight upload: a callback the loader calls after each tensor, and a
//! text bar on stderr for large checkpoints.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of checkpoint tensors uploaded so far, of all this load will upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// A progress callback; called after every uploaded tensor, last with
/// `bytes_done == bytes_total`.
#[derive(Clone)]
pub struct ProgressFn(Arc<dyn Fn(LoadProgress) + Send + Sync>);

impl fmt::Debug for ProgressFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProgressFn")
    }
}

impl ProgressFn {
    pub fn new(f: impl Fn(LoadProgress) + Send + Sync + 'static) -> Self {
        ProgressFn(Arc::new(f))
    }

    pub(crate) fn call(&self, p: LoadProgress) {
        (self.0)(p)
    }

    /// A bar on stderr, `label [#####.....]  45%  6.2/13.8 GB`, redrawn when the
    /// percentage changes; only for loads of at least `min_bytes`.
    pub fn stderr_bar(label: impl Into<String>, min_bytes: u64) -> Self {
        let label = label.into();
        let shown = AtomicU64::new(u64::MAX);
        ProgressFn::new(move |p| {
            if p.bytes_total < min_bytes || p.bytes_total == 0 {
                return;
            }
            let pct = p.bytes_done.saturating_mul(100) / p.bytes_total;
            if shown.swap(pct, Ordering::Relaxed) == pct {
                return;
            }
            let _ = write!(std::io::stderr(), "\r{}", render(&label, p));
            if p.bytes_done >= p.bytes_total {
                let _ = writeln!(std::io::stderr());
            }
        })
    }
}

/// One line of the bar (without carriage return).
pub fn render(label: &str, p: LoadProgress) -> String {
    const WIDTH: u64 = 30;
    let total = p.bytes_total.max(1);
    let done = p.bytes_done.min(total);
    let filled = (done * WIDTH / total) as usize;
    format!(
        "{label} [{}{}] {:>3}%  {:.1}/{:.1} GB",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled),
        done * 100 / total,
        done as f64 / 1e9,
        total as f64 / 1e9
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_fills_with_progress() {
        let half = render(
            "w",
            LoadProgress {
                bytes_done: 5_000_000_000,
                bytes_total: 10_000_000_000,
            },
        );
        assert_eq!(
            half,
            format!("w [{}{}]  50%  5.0/10.0 GB", "#".repeat(15), ".".repeat(15))
        );
        let done = render(
            "w",
            LoadProgress {
                bytes_done: 10,
                bytes_total: 10,
            },
        );
        assert!(done.contains(&"#".repeat(30)) && done.contains("100%"));
        // Never past the end, never a division by zero.
        assert!(render(
            "w",
            LoadProgress {
                bytes_done: 20,
                bytes_total: 10
            }
        )
        .contains("100%"));
        assert!(render(
            "w",
            LoadProgress {
                bytes_done: 0,
                bytes_total: 0
            }
        )
        .contains("0%"));
    }
}
