//! Logits processors and warpers with HF transformers semantics: repetition
//! penalty, then temperature, top-k, top-p and softmax, in HF's order.
//!
//! Scores are handled in f64 internally (the inputs are f32), so results can
//! differ from HF's f32 arithmetic only in the last bits and at exact top-p
//! boundaries.

use crate::sampling::params::{SamplingError, SamplingParams};

/// Index of the first maximum, like `torch.argmax`. NaN never wins; an empty
/// or all-NaN slice gives 0 (callers that care check with [`warp_probs`] or
/// [`crate::sampling::sample_token`], which report those cases as errors).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        match best {
            // `<=` keeps the earlier index on ties (also -0.0 vs 0.0).
            Some((_, b)) if x <= b => {}
            _ => best = Some((i, x)),
        }
    }
    // Vocabularies are far below 2^32 entries, so the cast cannot truncate.
    best.map_or(0, |(i, _)| i as u32)
}

/// The greedy token of a logits row: its [`argmax`], or `None` when the row holds
/// nothing but NaN and -inf (no usable logit).
pub fn greedy_token(logits: &[f32]) -> Option<u32> {
    if logits.iter().all(|x| x.is_nan() || *x == f32::NEG_INFINITY) {
        None
    } else {
        Some(argmax(logits))
    }
}

/// HF `RepetitionPenaltyLogitsProcessor`: for each distinct token id in
/// `context`, a negative logit is multiplied by `penalty` and a non-negative
/// one divided by it, so `penalty > 1` always makes repeats less likely.
/// Ids outside the vocabulary are ignored; `penalty == 1` is a no-op.
/// The penalty is not validated here (see [`SamplingParams::validate`]).
pub fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 || context.is_empty() {
        return;
    }
    // HF gathers then scatters, so a token repeated in the context is
    // penalised once, not once per occurrence.
    let mut ids = context.to_vec();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// Whether a logit can receive probability (NaN and `-inf` cannot).
fn usable(x: f32) -> bool {
    !x.is_nan() && x != f32::NEG_INFINITY
}

/// The normalised distribution HF would sample from: temperature, top-k,
/// top-p, then softmax. Filtered tokens get exactly 0. Greedy parameters
/// (temperature 0) give a one-hot at [`argmax`].
///
/// NaN logits are treated as `-inf` (never chosen). If some logits are `+inf`,
/// the distribution is uniform over them (the limit of softmax).
/// Tokens whose probability underflows f32 also come out as 0.
pub fn warp_probs(logits: &[f32], params: &SamplingParams) -> Result<Vec<f32>, SamplingError> {
    params.validate()?;
    if logits.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    if !logits.iter().any(|&x| usable(x)) {
        return Err(SamplingError::NoFiniteLogits);
    }
    if params.is_greedy() {
        let mut probs = vec![0.0f32; logits.len()];
        if let Some(p) = probs.get_mut(argmax(logits) as usize) {
            *p = 1.0;
        }
        return Ok(probs);
    }
    let t = f64::from(params.temperature);
    let mut scores: Vec<f64> = logits
        .iter()
        .map(|&x| {
            if x.is_nan() {
                f64::NEG_INFINITY
            } else {
                // f32 / f32 in f64 is strictly monotone, so temperature never
                // creates ties that top-k would then keep.
                f64::from(x) / t
            }
        })
        .collect();
    // HF only installs these warpers when they would do something.
    if params.top_k > 0 && params.top_k < scores.len() {
        apply_top_k(&mut scores, params.top_k);
    }
    if params.top_p < 1.0 {
        let top_p = f64::from(params.top_p);
        if let Some((mut e, sum)) = exps(&scores) {
            let probs: Vec<f64> = e.iter().map(|x| x / sum).collect();
            apply_top_p(&mut scores, &probs, top_p);
            // The survivors' exps over their sum: exactly the softmax of the filtered
            // scores (the top token survives, so the maximum is the same), without a
            // second pass of exp over the vocabulary.
            for (x, s) in e.iter_mut().zip(&scores) {
                if *s == f64::NEG_INFINITY {
                    *x = 0.0;
                }
            }
            let kept: f64 = e.iter().sum();
            return Ok(e.iter().map(|x| (x / kept) as f32).collect());
        }
        let probs = softmax(&scores);
        apply_top_p(&mut scores, &probs, top_p);
    }
    Ok(softmax(&scores).into_iter().map(|p| p as f32).collect())
}

/// [`warp_probs`] of `logits` after [`apply_repetition_penalty`] with `context`: the
/// distribution [`crate::sampling::sample_token`] draws from.
pub fn warp_penalised(
    logits: &[f32],
    context: &[u32],
    params: &SamplingParams,
) -> Result<Vec<f32>, SamplingError> {
    if params.repetition_penalty == 1.0 || context.is_empty() {
        return warp_probs(logits, params);
    }
    let mut row = logits.to_vec();
    apply_repetition_penalty(&mut row, context, params.repetition_penalty);
    warp_probs(&row, params)
}

/// HF `TopKLogitsWarper`: removes scores strictly below the k-th largest, so
/// ties with the k-th value survive. Requires `1 <= k < scores.len()`.
fn apply_top_k(scores: &mut [f64], k: usize) {
    let mut sorted = scores.to_vec();
    // Descending order; total_cmp is fine as NaN was mapped to -inf.
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    for s in scores.iter_mut() {
        if *s < threshold {
            *s = f64::NEG_INFINITY;
        }
    }
}

/// HF `TopPLogitsWarper` on `probs = softmax(scores)`: sort ascending, remove tokens
/// whose cumulative probability is `<= 1 - top_p`, always keeping the most likely
/// token. Ties are ordered by index (stable sort) where torch's order is unspecified.
///
/// Only tokens that can survive are sorted: one pass buckets the probabilities by
/// binary exponent; every bucket whose mass, with all below it, stays within the limit
/// is removed whole (each of its tokens has a prefix sum no larger), and the walk goes
/// on over the rest in sorted order from that mass. That is the full walk's decision up
/// to rounding at an exact boundary, without sorting the vocabulary (a 65k one cost
/// 4 ms a row, as much as a 7B decode step on a GPU).
fn apply_top_p(scores: &mut [f64], probs: &[f64], top_p: f64) {
    let limit = 1.0 - top_p;
    // Probabilities are in [0, 1]: the exponent bits order them (0 in bucket 0).
    let bucket = |p: f64| (p.to_bits() >> 52) as usize;
    let mut mass = vec![0.0f64; 1 << 11];
    for &p in probs {
        mass[bucket(p)] += p;
    }
    let (mut first, mut below) = (0, 0.0f64);
    while first < mass.len() && below + mass[first] <= limit {
        below += mass[first];
        first += 1;
    }
    // The ascending walk's order: by score, then by index (probabilities never
    // decrease with the score, so buckets below `first` hold the lowest scores).
    let mut rest: Vec<usize> = Vec::new();
    for (i, &p) in probs.iter().enumerate() {
        if bucket(p) < first {
            scores[i] = f64::NEG_INFINITY;
        } else {
            rest.push(i);
        }
    }
    rest.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let last = rest.len().saturating_sub(1);
    let mut cumulative = below;
    for (rank, &i) in rest.iter().enumerate() {
        cumulative += probs[i];
        // The cumulative sum only grows, so the first survivor ends removal.
        if rank == last || cumulative > limit {
            break;
        }
        scores[i] = f64::NEG_INFINITY;
    }
}

/// `exp(s - max)` of every score (exactly 0 for `-inf`) and their sum; `None` when
/// the maximum is not finite (see [`softmax`]).
fn exps(scores: &[f64]) -> Option<(Vec<f64>, f64)> {
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return None;
    }
    let e: Vec<f64> = scores
        .iter()
        .map(|&s| {
            if s == f64::NEG_INFINITY {
                0.0
            } else {
                (s - max).exp()
            }
        })
        .collect();
    // The max entry contributes exp(0) = 1, so the sum is >= 1.
    let sum = e.iter().sum();
    Some((e, sum))
}

/// Stable softmax in f64; `-inf` gives exactly 0. With `+inf` scores present
/// the result is uniform over them; with no usable score it is all zeros.
fn softmax(scores: &[f64]) -> Vec<f64> {
    if let Some((e, sum)) = exps(scores) {
        return e.into_iter().map(|x| x / sum).collect();
    }
    // The maximum is +inf (uniform over those) or -inf (nothing usable: all zeros).
    let n = scores.iter().filter(|&&s| s == f64::INFINITY).count();
    scores
        .iter()
        .map(|&s| {
            if s == f64::INFINITY {
                1.0 / n as f64
            } else {
                0.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            ..SamplingParams::default()
        }
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn argmax_first_max_and_nan_safe() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN, 0.5]), 3);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[-0.0, 0.0]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY, -5.0]), 2);
        assert_eq!(argmax(&[1.0, f32::INFINITY, f32::NAN]), 1);
    }

    #[test]
    fn repetition_penalty_hf_semantics() {
        let mut l = vec![2.0, -2.0, 1.0, 0.0, 4.0];
        // Token 0 twice (penalised once), 1 negative, 3 zero, 99 out of vocab.
        apply_repetition_penalty(&mut l, &[0, 1, 0, 3, 99], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0, 0.0, 4.0]);
        let mut same = vec![2.0, -2.0];
        apply_repetition_penalty(&mut same, &[0, 1], 1.0);
        assert_eq!(same, vec![2.0, -2.0]);
        // A penalty below 1 rewards repeats, as in HF.
        let mut r = vec![2.0, -2.0];
        apply_repetition_penalty(&mut r, &[0, 1], 0.5);
        assert_eq!(r, vec![4.0, -1.0]);
    }

    #[test]
    fn greedy_is_one_hot() {
        let p = warp_probs(&[0.1, 5.0, 5.0, -1.0], &SamplingParams::greedy()).unwrap();
        assert_eq!(p, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn plain_softmax_and_temperature() {
        let logits = [0.0f32, 2.0f32.ln(), 1.0f32.ln()]; // weights 1:2:1
        let p = warp_probs(&logits, &params(1.0, 0, 1.0)).unwrap();
        assert!(close(&p, &[0.25, 0.5, 0.25]));
        // Temperature 0.5 squares the weights: 1:4:1.
        let p = warp_probs(&logits, &params(0.5, 0, 1.0)).unwrap();
        assert!(close(&p, &[1.0 / 6.0, 4.0 / 6.0, 1.0 / 6.0]));
    }

    #[test]
    fn top_k_keeps_ties_at_kth_value() {
        let logits = [1.0, 3.0, 2.0, 2.0, 0.0];
        let p = warp_probs(&logits, &params(1.0, 2, 1.0)).unwrap();
        assert!(p[1] > 0.0 && p[2] > 0.0 && p[3] > 0.0);
        assert_eq!(p[0], 0.0);
        assert_eq!(p[4], 0.0);
        let p = warp_probs(&logits, &params(1.0, 1, 1.0)).unwrap();
        assert_eq!(p, vec![0.0, 1.0, 0.0, 0.0, 0.0]);
        // k >= vocab disables the filter.
        let p = warp_probs(&logits, &params(1.0, 9, 1.0)).unwrap();
        assert!(p.iter().all(|&x| x > 0.0));
    }

    #[test]
    fn top_p_hf_example() {
        let probs = [0.5f32, 0.3, 0.15, 0.05];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        // Ascending cumulative: 0.05, 0.20, 0.50, 1.0; limit 0.25 removes two.
        let p = warp_probs(&logits, &params(1.0, 0, 0.75)).unwrap();
        assert!(close(&p, &[0.625, 0.375, 0.0, 0.0]));
        assert_eq!(p[2], 0.0);
        // A tiny top_p still keeps the single most likely token.
        let p = warp_probs(&logits, &params(1.0, 0, 1e-6)).unwrap();
        assert_eq!(p, vec![1.0, 0.0, 0.0, 0.0]);
    }

    /// The reference: HF's walk over the whole ascending sort.
    fn top_p_by_full_sort(scores: &mut [f64], top_p: f64) {
        let probs = softmax(scores);
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let last = order.len() - 1;
        let mut cumulative = 0.0f64;
        for (rank, &i) in order.iter().enumerate() {
            cumulative += probs[i];
            if rank == last || cumulative > 1.0 - top_p {
                break;
            }
            scores[i] = f64::NEG_INFINITY;
        }
    }

    #[test]
    fn top_p_keeps_what_the_full_sort_keeps() {
        let mut s = 99u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        for (n, spread) in [
            (5usize, 1.0),
            (300, 3.0),
            (5000, 8.0),
            (5000, 0.5),
            (20_000, 20.0),
        ] {
            for top_p in [0.05, 0.5, 0.9, 0.99, 0.999_999] {
                // With ties: values on a coarse grid.
                let base: Vec<f64> = (0..n)
                    .map(|_| (next() * spread * 8.0).round() / 8.0)
                    .collect();
                let (mut fast, mut full) = (base.clone(), base.clone());
                apply_top_p(&mut fast, &softmax(&base), top_p);
                top_p_by_full_sort(&mut full, top_p);
                let kept = |v: &[f64]| v.iter().filter(|x| x.is_finite()).count();
                assert_eq!(
                    fast,
                    full,
                    "n {n}, spread {spread}, top_p {top_p}: kept {} vs {}",
                    kept(&fast),
                    kept(&full)
                );
            }
        }
    }

    #[test]
    fn top_k_then_top_p_order() {
        // After top-k=3 the survivors are 0.5:0.3:0.15 renormalised
        // (~0.526, 0.316, 0.158); top_p 0.8 then drops the smallest.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let p = warp_probs(&logits, &params(1.0, 3, 0.8)).unwrap();
        assert!(close(&p, &[0.625, 0.375, 0.0, 0.0]));
    }

    #[test]
    fn non_finite_logits() {
        let p = warp_probs(&[f32::NAN, 0.0, f32::NEG_INFINITY], &params(1.0, 0, 1.0)).unwrap();
        assert_eq!(p, vec![0.0, 1.0, 0.0]);
        let p = warp_probs(&[f32::INFINITY, 0.0, f32::INFINITY], &params(0.7, 0, 0.9)).unwrap();
        assert_eq!(p, vec![0.5, 0.0, 0.5]);
        assert_eq!(
            warp_probs(&[f32::NAN, f32::NEG_INFINITY], &params(1.0, 0, 1.0)),
            Err(SamplingError::NoFiniteLogits)
        );
        assert_eq!(
            warp_probs(&[f32::NAN], &SamplingParams::greedy()),
            Err(SamplingError::NoFiniteLogits)
        );
        assert_eq!(
            warp_probs(&[], &params(1.0, 0, 1.0)),
            Err(SamplingError::EmptyLogits)
        );
    }

    #[test]
    fn invalid_params_are_reported() {
        assert_eq!(
            warp_probs(&[1.0], &params(-1.0, 0, 1.0)),
            Err(SamplingError::InvalidTemperature { value: -1.0 })
        );
        assert_eq!(
            warp_probs(&[1.0], &params(1.0, 0, 0.0)),
            Err(SamplingError::InvalidTopP { value: 0.0 })
        );
    }

    #[test]
    fn softmax_edge_cases() {
        assert_eq!(softmax(&[f64::NEG_INFINITY; 2]), vec![0.0, 0.0]);
        let s = softmax(&[1000.0, 1000.0]);
        assert_eq!(s, vec![0.5, 0.5]);
    }
}
