//! Statistical tests of [`accept_sampling`]: emitted tokens must follow the
//! target distribution exactly (chi-square against the target), and
//! deliberately broken acceptance rules must fail the same test, which shows
//! the test has the power to catch a wrong implementation.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::sampling::testutil::{chi_square, generous_threshold};

const VOCAB: usize = 4;
const TRIALS: usize = 20_000;

/// Target rows by absolute position, independent of the prefix, so the
/// target's autoregressive distribution of tokens (a, b) is P[0][a] * P[1][b].
/// Token 1 has target probability 0 at position 0 but draft probability 0.3.
const P: [[f32; VOCAB]; 4] = [
    [0.1, 0.0, 0.5, 0.4],
    [0.4, 0.1, 0.4, 0.1],
    [0.25, 0.25, 0.25, 0.25],
    [0.7, 0.1, 0.1, 0.1],
];

/// Draft rows by absolute position; Q[1] never proposes tokens 0 or 2, which
/// the target must then supply through the residual.
const Q: [[f32; VOCAB]; 3] = [
    [0.4, 0.3, 0.2, 0.1],
    [0.0, 0.5, 0.0, 0.5],
    [0.5, 0.2, 0.2, 0.1],
];

type Rule = fn(&[u32], &[&[f32]], &[&[f32]], &mut Rng) -> Result<Verdict, SpeculativeError>;

/// Broken: accepts every draft (the output follows the draft model).
fn accept_always(
    drafts: &[u32],
    _q: &[&[f32]],
    p: &[&[f32]],
    rng: &mut Rng,
) -> Result<Verdict, SpeculativeError> {
    Ok(Verdict {
        accepted: drafts.len(),
        next_token: sample_from_probs(p[drafts.len()], rng),
    })
}

/// Broken: correct acceptance test, but after a rejection resamples from
/// `p_i` instead of the residual `max(0, p_i - q_i)`.
fn resample_from_p(
    drafts: &[u32],
    q: &[&[f32]],
    p: &[&[f32]],
    rng: &mut Rng,
) -> Result<Verdict, SpeculativeError> {
    for (i, &x) in drafts.iter().enumerate() {
        let (pi, qi) = (f64::from(p[i][x as usize]), f64::from(q[i][x as usize]));
        if !(qi > 0.0 && rng.next_f64() * qi < pi) {
            return Ok(Verdict {
                accepted: i,
                next_token: sample_from_probs(p[i], rng),
            });
        }
    }
    Ok(Verdict {
        accepted: drafts.len(),
        next_token: sample_from_probs(p[drafts.len()], rng),
    })
}

/// Generates tokens by speculative rounds of `k` drafts until at least
/// `want` tokens exist, and returns the first `want`.
fn generate(rule: Rule, k: usize, want: usize, rng: &mut Rng) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    while out.len() < want {
        let pos = out.len();
        let drafts: Vec<u32> = (0..k)
            .map(|j| sample_from_probs(&Q[pos + j], rng))
            .collect();
        let q_rows: Vec<&[f32]> = (0..k).map(|j| &Q[pos + j][..]).collect();
        let p_rows: Vec<&[f32]> = (0..=k).map(|j| &P[pos + j][..]).collect();
        let v = rule(&drafts, &q_rows, &p_rows, rng).unwrap();
        out.extend(v.emitted(&drafts));
    }
    out.truncate(want);
    out
}

/// Chi-square statistic of the first emitted token against P[0].
fn first_token_stat(rule: Rule, k: usize, seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let mut counts = [0u64; VOCAB];
    for _ in 0..TRIALS {
        counts[generate(rule, k, 1, &mut rng)[0] as usize] += 1;
    }
    let expected: Vec<f64> = P[0].iter().map(|&p| f64::from(p)).collect();
    chi_square(&counts, &expected)
}

/// Chi-square statistic of the first two emitted tokens' joint against the
/// target's autoregressive distribution P[0][a] * P[1][b].
fn joint_stat(rule: Rule, k: usize, seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let mut counts = [0u64; VOCAB * VOCAB];
    for _ in 0..TRIALS {
        let t = generate(rule, k, 2, &mut rng);
        counts[t[0] as usize * VOCAB + t[1] as usize] += 1;
    }
    let expected: Vec<f64> = (0..VOCAB * VOCAB)
        .map(|c| f64::from(P[0][c / VOCAB]) * f64::from(P[1][c % VOCAB]))
        .collect();
    chi_square(&counts, &expected)
}

/// Degrees of freedom: non-zero cells minus one.
const DF_FIRST: usize = 2; // P[0] has 3 non-zero entries
const DF_JOINT: usize = 3 * 4 - 1; // 3 x 4 non-zero cells

#[test]
fn first_token_follows_target_k1_and_k2() {
    for (k, seed) in [(1, 11), (2, 12)] {
        let stat = first_token_stat(accept_sampling, k, seed);
        let limit = generous_threshold(DF_FIRST);
        assert!(stat < limit, "k={k}: chi2 {stat} >= {limit}");
    }
}

#[test]
fn first_two_tokens_joint_follows_target_k2() {
    let stat = joint_stat(accept_sampling, 2, 13);
    let limit = generous_threshold(DF_JOINT);
    assert!(stat < limit, "chi2 {stat} >= {limit}");
}

#[test]
fn always_accept_fails_the_test() {
    assert!(first_token_stat(accept_always, 1, 11) > generous_threshold(DF_FIRST));
    assert!(joint_stat(accept_always, 2, 13) > generous_threshold(DF_JOINT));
}

#[test]
fn resampling_from_p_fails_the_test() {
    let first = first_token_stat(resample_from_p, 1, 11);
    assert!(first > generous_threshold(DF_FIRST), "chi2 {first}");
    // Finite: the error is in proportions, not impossible tokens.
    assert!(first.is_finite());
    let joint = joint_stat(resample_from_p, 2, 13);
    assert!(joint > generous_threshold(DF_JOINT), "chi2 {joint}");
}
