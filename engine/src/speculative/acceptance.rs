//! Verifying a round of draft tokens against the target model: greedy
//! (exact-match) acceptance and speculative-sampling acceptance with
//! residual resampling. See the parent module for the algorithm.
//!
//! Rows are indexed by draft prefix length: row `i` is the distribution (or
//! logits) for the position after the first `i` draft tokens, so the target
//! provides `k + 1` rows for `k` drafts (one forward pass over the drafts).
//! Draft and target rows must cover the same vocabulary; slice both to the
//! shared vocabulary first if the models pad it differently.

use std::fmt;

use crate::sampling::{greedy_token, sample_from_probs, Rng};

/// The outcome of verifying one round of `k` draft tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Number of draft tokens accepted (`0..=k`).
    pub accepted: usize,
    /// The target's token after the accepted drafts: a correction when a
    /// draft was rejected, a bonus token when all `k` were accepted.
    pub next_token: u32,
}

impl Verdict {
    /// Tokens emitted this round: `drafts[..accepted]` then `next_token`.
    pub fn emitted(&self, draft_tokens: &[u32]) -> Vec<u32> {
        let accepted = &draft_tokens[..self.accepted.min(draft_tokens.len())];
        let mut out = Vec::with_capacity(accepted.len() + 1);
        out.extend_from_slice(accepted);
        out.push(self.next_token);
        out
    }

    /// Number of tokens emitted this round (`accepted + 1`).
    pub fn num_emitted(&self) -> usize {
        self.accepted + 1
    }
}

/// Which set of rows a shape error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    Draft,
    Target,
}

impl fmt::Display for RowKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Draft => "draft",
            Self::Target => "target",
        })
    }
}

/// Inconsistent inputs to an acceptance function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpeculativeError {
    /// The target must give one row per draft token plus one.
    #[error("expected {expected} target rows (draft tokens + 1), got {got}")]
    TargetRowCount { expected: usize, got: usize },
    /// The draft must give one row per draft token.
    #[error("expected {expected} draft rows (one per draft token), got {got}")]
    DraftRowCount { expected: usize, got: usize },
    /// Target row 0 is empty, so there is no vocabulary.
    #[error("empty vocabulary")]
    EmptyVocab,
    /// A row's length differs from target row 0's.
    #[error("{kind} row {row} has {got} entries, expected {expected}")]
    RowLength {
        kind: RowKind,
        row: usize,
        expected: usize,
        got: usize,
    },
    /// A draft token id is not below the vocabulary size.
    #[error("draft token {token} at position {position} is outside the vocabulary of {vocab}")]
    TokenOutOfVocab {
        position: usize,
        token: u32,
        vocab: usize,
    },
    /// A target logits row is all NaN / `-inf` (greedy).
    #[error("target row {row} has no usable logits")]
    NoFiniteLogits { row: usize },
    /// A target probability row has no positive mass to sample from.
    #[error("target row {row} has no positive probability")]
    NoProbabilityMass { row: usize },
}

/// Checks row counts, row lengths and draft ids; returns the vocab size.
fn check_shapes(
    draft_tokens: &[u32],
    draft_rows: Option<&[&[f32]]>,
    target_rows: &[&[f32]],
) -> Result<usize, SpeculativeError> {
    let k = draft_tokens.len();
    if target_rows.len() != k + 1 {
        return Err(SpeculativeError::TargetRowCount {
            expected: k + 1,
            got: target_rows.len(),
        });
    }
    if let Some(rows) = draft_rows {
        if rows.len() != k {
            return Err(SpeculativeError::DraftRowCount {
                expected: k,
                got: rows.len(),
            });
        }
    }
    let vocab = target_rows.first().map_or(0, |r| r.len());
    if vocab == 0 {
        return Err(SpeculativeError::EmptyVocab);
    }
    let draft_rows = draft_rows.unwrap_or(&[]);
    for (kind, rows) in [(RowKind::Target, target_rows), (RowKind::Draft, draft_rows)] {
        for (row, r) in rows.iter().enumerate() {
            if r.len() != vocab {
                return Err(SpeculativeError::RowLength {
                    kind,
                    row,
                    expected: vocab,
                    got: r.len(),
                });
            }
        }
    }
    for (position, &token) in draft_tokens.iter().enumerate() {
        if token as usize >= vocab {
            return Err(SpeculativeError::TokenOutOfVocab {
                position,
                token,
                vocab,
            });
        }
    }
    Ok(vocab)
}

/// Greedy verification: accepts the longest draft prefix that matches the
/// target's argmax at every position, and returns the target's argmax after
/// it. Emitting `drafts[..accepted]` then `next_token` reproduces plain
/// greedy decoding token for token (apply any repetition penalty to each row
/// first, with the context including the draft prefix, as plain decoding
/// would). `target_logits` has `k + 1` rows. Uses no randomness.
pub fn accept_greedy(
    draft_tokens: &[u32],
    target_logits: &[&[f32]],
) -> Result<Verdict, SpeculativeError> {
    check_shapes(draft_tokens, None, target_logits)?;
    let best: Vec<Option<u32>> = target_logits.iter().map(|r| greedy_token(r)).collect();
    accept_greedy_tokens(draft_tokens, &best)
}

/// [`accept_greedy`] from the target's greedy token of each row (computed where the
/// logits are, e.g. on the GPU): `None` marks a row without a usable logit.
pub fn accept_greedy_tokens(
    draft_tokens: &[u32],
    target_tokens: &[Option<u32>],
) -> Result<Verdict, SpeculativeError> {
    let k = draft_tokens.len();
    if target_tokens.len() != k + 1 {
        return Err(SpeculativeError::TargetRowCount {
            expected: k + 1,
            got: target_tokens.len(),
        });
    }
    let token = |i: usize| target_tokens[i].ok_or(SpeculativeError::NoFiniteLogits { row: i });
    for (i, &draft) in draft_tokens.iter().enumerate() {
        let best = token(i)?;
        if draft != best {
            return Ok(Verdict {
                accepted: i,
                next_token: best,
            });
        }
    }
    // The length check above guarantees row k.
    Ok(Verdict {
        accepted: k,
        next_token: token(k)?,
    })
}

/// Whether a probability row has positive finite mass to sample from.
fn has_mass(row: &[f32]) -> bool {
    row.iter().any(|&p| p.is_finite() && p > 0.0)
}

/// Samples from `row`, or reports it as empty.
fn sample_row(row: &[f32], index: usize, rng: &mut Rng) -> Result<u32, SpeculativeError> {
    if !has_mass(row) {
        return Err(SpeculativeError::NoProbabilityMass { row: index });
    }
    Ok(sample_from_probs(row, rng))
}

/// Speculative-sampling verification (Leviathan et al. 2023, Chen et al.
/// 2023). For each draft token `x_i` in order, draws `u ~ U[0,1)` and accepts
/// iff `u * q_i[x] < p_i[x]`, i.e. `u < min(1, p_i[x] / q_i[x])` without a
/// division; strict `<` means a token the target gives probability 0 is
/// never accepted. A draft probability `q_i[x] <= 0` (which cannot happen if
/// the draft really sampled `x` from `q_i`) is treated as a rejection, which
/// keeps the output a valid sample from `p_i`. On the first rejection the
/// next token is drawn from `norm(max(0, p_i - q_i))`, or from `p_i` when that
/// residual is all zero (`p_i == q_i`); if all `k` drafts are accepted a
/// bonus token is drawn from `p_k`. The emitted tokens are then distributed
/// exactly as if sampled autoregressively from the target rows.
///
/// `draft_probs` holds the `k` rows `q_i` the drafts were sampled from and
/// `target_probs` the `k + 1` rows `p_i`, both after the same warping (see
/// [`crate::sampling::warp_probs`]); rows need not be exactly normalised.
///
/// Randomness, in this fixed order: one `rng.next_f64()` per examined draft
/// (all accepted ones plus the rejected one), then one draw (through
/// [`sample_from_probs`]) for `next_token`. So a round consumes
/// `accepted + 2` draws after a rejection and `k + 1` when all are accepted.
pub fn accept_sampling(
    draft_tokens: &[u32],
    draft_probs: &[&[f32]],
    target_probs: &[&[f32]],
    rng: &mut Rng,
) -> Result<Verdict, SpeculativeError> {
    check_shapes(draft_tokens, Some(draft_probs), target_probs)?;
    for (i, ((&x, q_row), p_row)) in draft_tokens
        .iter()
        .zip(draft_probs)
        .zip(target_probs)
        .enumerate()
    {
        // In range: check_shapes verified x < vocab == row lengths.
        let p = f64::from(p_row[x as usize]);
        let q = f64::from(q_row[x as usize]);
        let u = rng.next_f64();
        // NaN p or q fails these comparisons and so rejects.
        if q > 0.0 && q.is_finite() && u * q < p {
            continue;
        }
        // `f32::max` maps NaN differences to 0.
        let residual: Vec<f32> = p_row
            .iter()
            .zip(q_row.iter())
            .map(|(&p, &q)| (p - q).max(0.0))
            .collect();
        // sample_from_probs normalises by the residual's total itself.
        let next_token = if has_mass(&residual) {
            sample_from_probs(&residual, rng)
        } else {
            sample_row(p_row, i, rng)?
        };
        return Ok(Verdict {
            accepted: i,
            next_token,
        });
    }
    let k = draft_tokens.len();
    let next_token = sample_row(target_probs[k], k, rng)?;
    Ok(Verdict {
        accepted: k,
        next_token,
    })
}

#[cfg(test)]
mod stats_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sampling::argmax;

    /// The token path gives the logits path's verdict, row errors included.
    #[test]
    fn greedy_tokens_agree_with_greedy_logits() {
        let vocab = 7;
        let rows: Vec<Vec<f32>> = (0..4).map(|h| one_hot_logits(vocab, h + 1)).collect();
        let ids: Vec<Option<u32>> = rows.iter().map(|r| greedy_token(r)).collect();
        for drafts in [vec![1, 2, 3], vec![1, 5, 3], vec![6, 2, 3], vec![1, 2, 4]] {
            let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
            assert_eq!(
                accept_greedy(&drafts, &refs).unwrap(),
                accept_greedy_tokens(&drafts, &ids).unwrap()
            );
        }
        assert_eq!(
            accept_greedy_tokens(&[1, 2, 3], &ids).unwrap(),
            Verdict {
                accepted: 3,
                next_token: 4
            }
        );
        let broken = [Some(1), None, Some(3)];
        assert!(matches!(
            accept_greedy_tokens(&[1, 2], &broken),
            Err(SpeculativeError::NoFiniteLogits { row: 1 })
        ));
        // A mismatch before the broken row decides first, as with logits.
        assert_eq!(accept_greedy_tokens(&[4, 2], &broken).unwrap().accepted, 0);
        assert!(matches!(
            accept_greedy_tokens(&[1], &ids),
            Err(SpeculativeError::TargetRowCount {
                expected: 2,
                got: 4
            })
        ));
    }

    fn one_hot_logits(vocab: usize, hot: usize) -> Vec<f32> {
        (0..vocab)
            .map(|i| if i == hot { 1.0 } else { 0.0 })
            .collect()
    }

    #[test]
    fn greedy_accepts_all_and_gives_bonus() {
        let rows: Vec<Vec<f32>> = [2, 0, 3, 1].iter().map(|&h| one_hot_logits(5, h)).collect();
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let v = accept_greedy(&[2, 0, 3], &refs).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 3,
                next_token: 1
            }
        );
        assert_eq!(v.emitted(&[2, 0, 3]), vec![2, 0, 3, 1]);
        assert_eq!(v.num_emitted(), 4);
    }

    #[test]
    fn greedy_rejection_at_j() {
        let rows: Vec<Vec<f32>> = [2, 0, 3, 1].iter().map(|&h| one_hot_logits(5, h)).collect();
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        for j in 0..3 {
            let mut drafts = vec![2, 0, 3];
            drafts[j] = 4;
            let v = accept_greedy(&drafts, &refs).unwrap();
            assert_eq!(v.accepted, j);
            assert_eq!(v.next_token, [2, 0, 3][j]);
        }
        // k = 0: just the target's argmax.
        let v = accept_greedy(&[], &refs[..1]).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 0,
                next_token: 2
            }
        );
    }

    #[test]
    fn greedy_ties_use_first_index_like_plain_decoding() {
        let row = [0.5f32, 0.9, 0.9];
        let v = accept_greedy(&[2], &[&row, &row]).unwrap();
        assert_eq!(
            v,
            Verdict {
                accepted: 0,
                next_token: 1
            }
        );
    }

    /// A deterministic toy "model": logits depend on the whole prefix.
    fn toy_logits(prefix: &[u32], vocab: u32, salt: u64) -> Vec<f32> {
        let mut h = salt;
        for &t in prefix {
            h = (h ^ u64::from(t)).wrapping_mul(0x100_0000_01b3);
        }
        let mut rng = Rng::new(h);
        (0..vocab).map(|_| rng.next_f32()).collect()
    }

    #[test]
    fn greedy_speculation_reproduces_plain_greedy() {
        let (vocab, n) = (7u32, 60usize);
        let prompt = vec![1u32, 2, 3];
        let mut plain = prompt.clone();
        while plain.len() < prompt.len() + n {
            plain.push(argmax(&toy_logits(&plain, vocab, 1)));
        }
        // Draft: the target's argmax but wrong whenever its own toy model's
        // first logit is large, so rounds mix acceptances and rejections.
        let mut spec = prompt.clone();
        let mut rounds = 0;
        while spec.len() < prompt.len() + n {
            let mut drafts = Vec::new();
            let mut ctx = spec.clone();
            for _ in 0..4 {
                let t = argmax(&toy_logits(&ctx, vocab, 1));
                let noise = toy_logits(&ctx, vocab, 2)[0];
                let d = if noise > 0.7 { (t + 1) % vocab } else { t };
                drafts.push(d);
                ctx.push(d);
            }
            let rows: Vec<Vec<f32>> = (0..=drafts.len())
                .map(|i| {
                    let mut c = spec.clone();
                    c.extend_from_slice(&drafts[..i]);
                    toy_logits(&c, vocab, 1)
                })
                .collect();
            let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
            let v = accept_greedy(&drafts, &refs).unwrap();
            spec.extend(v.emitted(&drafts));
            rounds += 1;
        }
        spec.truncate(prompt.len() + n);
        assert_eq!(spec, plain);
        assert!(rounds < n, "speculation should save passes");
    }

    #[test]
    fn shape_errors() {
        let r = [0.5f32, 0.5];
        let short = [1.0f32];
        assert_eq!(
            accept_greedy(&[0], &[&r]),
            Err(SpeculativeError::TargetRowCount {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            accept_greedy(&[0], &[&r, &short]),
            Err(SpeculativeError::RowLength {
                kind: RowKind::Target,
                row: 1,
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            accept_greedy(&[5], &[&r, &r]),
            Err(SpeculativeError::TokenOutOfVocab {
                position: 0,
                token: 5,
                vocab: 2
            })
        );
        assert_eq!(
            accept_greedy(&[], &[&[]]),
            Err(SpeculativeError::EmptyVocab)
        );
        let mut rng = Rng::new(0);
        assert_eq!(
            accept_sampling(&[0], &[], &[&r, &r], &mut rng),
            Err(SpeculativeError::DraftRowCount {
                expected: 1,
                got: 0
            })
        );
        assert_eq!(
            accept_sampling(&[0], &[&short], &[&r, &r], &mut rng),
            Err(SpeculativeError::RowLength {
                kind: RowKind::Draft,
                row: 0,
                expected: 2,
                got: 1
            })
        );
        let nan = [f32::NAN, f32::NEG_INFINITY];
        assert_eq!(
            accept_greedy(&[0], &[&nan, &r]),
            Err(SpeculativeError::NoFiniteLogits { row: 0 })
        );
        let zero = [0.0f32, 0.0];
        assert_eq!(
            accept_sampling(&[], &[], &[&zero], &mut rng),
            Err(SpeculativeError::NoProbabilityMass { row: 0 })
        );
    }

    #[test]
    fn sampling_equal_distributions_always_accept() {
        let p = [0.2f32, 0.3, 0.5];
        let mut rng = Rng::new(4);
        for _ in 0..200 {
            let v = accept_sampling(&[1, 2], &[&p, &p], &[&p, &p, &p], &mut rng).unwrap();
            assert_eq!(v.accepted, 2);
        }
    }

    #[test]
    fn sampling_never_accepts_target_zero_and_residual_fallback() {
        let p = [0.5f32, 0.5, 0.0];
        let q = [0.2f32, 0.2, 0.6];
        let mut rng = Rng::new(6);
        for _ in 0..200 {
            let v = accept_sampling(&[2], &[&q], &[&p, &p], &mut rng).unwrap();
            assert_eq!(v.accepted, 0);
            assert!(v.next_token < 2);
        }
        // q(x) = 0 for the draft and p == q: residual is zero, sample from p.
        let pq = [0.5f32, 0.5, 0.0];
        for _ in 0..50 {
            let v = accept_sampling(&[2], &[&pq], &[&pq, &pq], &mut rng).unwrap();
            assert_eq!(v.accepted, 0);
            assert!(v.next_token < 2);
        }
    }

    #[test]
    fn sampling_consumes_draws_in_documented_order() {
        let p = [0.5f32, 0.5];
        let q_reject = [0.0f32, 1.0]; // q(x=1)=1 vs p=0.5: may reject
                                      // All accepted: k + 1 draws.
        let mut a = Rng::new(9);
        let v = accept_sampling(&[0, 1], &[&p, &p], &[&p, &p, &p], &mut a).unwrap();
        assert_eq!(v.accepted, 2);
        let mut b = Rng::new(9);
        for _ in 0..3 {
            b.next_f64();
        }
        assert_eq!(a, b);
        // Rejection at position j: j + 2 draws. Row 0 rejects about half
        // the time; row 1 (q == p) always accepts.
        let (mut rejected, mut all) = (0, 0);
        for seed in 0..64 {
            let mut a = Rng::new(seed);
            let v = accept_sampling(&[1, 0], &[&q_reject, &p], &[&p, &p, &p], &mut a).unwrap();
            let draws = if v.accepted == 2 { 3 } else { v.accepted + 2 };
            if v.accepted == 2 {
                all += 1;
            } else {
                assert_eq!(v.accepted, 0);
                rejected += 1;
            }
            let mut b = Rng::new(seed);
            for _ in 0..draws {
                b.next_f64();
            }
            assert_eq!(a, b);
        }
        assert!(rejected > 0 && all > 0);
        // Same seed, same verdict.
        let run = |seed| {
            let mut r = Rng::new(seed);
            accept_sampling(&[1], &[&q_reject], &[&p, &p], &mut r).unwrap()
        };
        assert_eq!(run(77), run(77));
    }
}
