//! Test-only statistics helpers shared by the sampling and speculative tests.

/// Pearson's chi-square statistic of observed counts against expected
/// probabilities. Cells with zero expected probability must have zero counts;
/// any count there makes the statistic infinite.
pub(crate) fn chi_square(counts: &[u64], probs: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    let n = n as f64;
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            let expected = n * p;
            if expected == 0.0 {
                if c == 0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                let d = c as f64 - expected;
                d * d / expected
            }
        })
        .sum()
}

/// A generous acceptance threshold for a chi-square statistic with `df`
/// degrees of freedom: the Wilson-Hilferty approximation of the quantile at
/// z = 5 (upper tail about 3e-7), e.g. ~36 for df 3 and ~61 for df 15. Correct
/// code then does not flake when a seed changes, while the broken variants in
/// the tests exceed it by orders of magnitude.
pub(crate) fn generous_threshold(df: usize) -> f64 {
    let df = df as f64;
    let h = 2.0 / (9.0 * df);
    df * (1.0 - h + 5.0 * h.sqrt()).powi(3)
}
