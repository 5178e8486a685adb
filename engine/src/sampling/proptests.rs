//! Property tests for the sampling module: warper invariants, greedy
//! equivalence, reproducibility and stop-string streaming safety.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use crate::sampling::{
    argmax, sample_token, warp_probs, Rng, SamplingParams, StopChecker, StopCriteria,
};

/// Bounded logits so no kept token's probability underflows f32, which makes
/// "zero exactly where filtered" an exact property.
fn logits() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-10.0f32..10.0, 1..40)
}

fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        ..SamplingParams::default()
    }
}

/// Reference top-k rule: kept iff fewer than k scores are strictly greater.
fn survives_top_k(logits: &[f32], i: usize, k: usize) -> bool {
    k == 0 || logits.iter().filter(|&&x| x > logits[i]).count() < k
}

proptest! {
    #[test]
    fn warp_sums_to_one_and_is_zero_exactly_where_top_k_filters(
        logits in logits(), t in 0.3f32..2.0, k in 0usize..45,
    ) {
        let p = warp_probs(&logits, &params(t, k, 1.0)).unwrap();
        let sum: f64 = p.iter().map(|&x| f64::from(x)).sum();
        prop_assert!((sum - 1.0).abs() < 1e-5, "sum {}", sum);
        for (i, &x) in p.iter().enumerate() {
            prop_assert_eq!(x > 0.0, survives_top_k(&logits, i, k), "token {}", i);
        }
    }

    #[test]
    fn top_p_keeps_the_minimal_top_set(
        logits in logits(), t in 0.3f32..2.0, k in 0usize..45, top_p in 0.01f32..1.0,
    ) {
        // `r`: the distribution top-p sees (after temperature and top-k).
        let r = warp_probs(&logits, &params(t, k, 1.0)).unwrap();
        let p = warp_probs(&logits, &params(t, k, top_p)).unwrap();
        let sum: f64 = p.iter().map(|&x| f64::from(x)).sum();
        prop_assert!((sum - 1.0).abs() < 1e-5);
        let kept: Vec<usize> = (0..p.len()).filter(|&i| p[i] > 0.0).collect();
        prop_assert!(!kept.is_empty());
        let mass: f64 = kept.iter().map(|&i| f64::from(r[i])).sum();
        let min_kept = kept.iter().map(|&i| r[i]).fold(f32::INFINITY, f32::min);
        for j in 0..p.len() {
            if p[j] == 0.0 {
                // Only the least likely tokens are dropped.
                prop_assert!(r[j] <= min_kept);
            } else {
                // Survivors are renormalised, not otherwise changed.
                let want = f64::from(r[j]) / mass;
                prop_assert!((f64::from(p[j]) - want).abs() < 1e-5);
            }
        }
        let top_p = f64::from(top_p);
        prop_assert!(mass >= top_p - 1e-5, "kept mass {} < top_p {}", mass, top_p);
        prop_assert!(
            mass - f64::from(min_kept) < top_p + 1e-5,
            "set not minimal: mass {} without smallest {}", mass, min_kept
        );
    }

    #[test]
    fn top_k_one_equals_greedy(
        logits in logits(), t in 0.3f32..2.0, top_p in 0.01f32..=1.0, seed in any::<u64>(),
    ) {
        let best = argmax(&logits);
        let max = logits[best as usize];
        let p = warp_probs(&logits, &params(t, 1, top_p)).unwrap();
        // Every kept token is a maximum (ties at the top are kept, as in HF).
        for (i, &x) in p.iter().enumerate() {
            prop_assert!(x == 0.0 || logits[i] == max);
        }
        if logits.iter().filter(|&&x| x == max).count() == 1 {
            let greedy = warp_probs(&logits, &SamplingParams::greedy()).unwrap();
            prop_assert_eq!(&p, &greedy);
            let mut rng = Rng::new(seed);
            let tok = sample_token(&logits, &[], &params(t, 1, top_p), &mut rng).unwrap();
            prop_assert_eq!(tok, best);
        }
    }

    #[test]
    fn same_seed_same_sequence(
        logits in logits(), seed in any::<u64>(), t in 0.3f32..2.0,
        k in 0usize..10, top_p in 0.05f32..=1.0,
    ) {
        let p = SamplingParams { seed, ..params(t, k, top_p) };
        let run = || {
            let mut rng = p.rng();
            (0..16)
                .map(|_| sample_token(&logits, &[], &p, &mut rng).unwrap())
                .collect::<Vec<u32>>()
        };
        prop_assert_eq!(run(), run());
    }

    #[test]
    fn streaming_never_emits_part_of_a_completed_stop_string(
        stops in prop::collection::vec("[ab\u{e9}c]{1,4}", 1..3),
        chunks in prop::collection::vec("[ab\u{e9}cd]{0,3}", 1..30),
    ) {
        let mut checker = StopChecker::new(StopCriteria {
            eos_ids: vec![],
            stop_strings: stops.clone(),
            max_new_tokens: usize::MAX,
        });
        let mut text = String::new();
        let mut emitted = 0usize;
        for (i, chunk) in chunks.iter().enumerate() {
            text.push_str(chunk);
            if let Some(stop) = checker.push(i as u32, &text) {
                let first = stops.iter().filter_map(|s| text.find(s.as_str())).min();
                prop_assert_eq!(Some(stop.text_end), first);
                // Nothing streamed earlier reaches into the stop string.
                prop_assert!(emitted <= stop.text_end);
                return Ok(());
            }
            let safe = checker.safe_text_len(&text);
            prop_assert!(safe >= emitted, "safe length went backwards");
            prop_assert!(text.is_char_boundary(safe));
            emitted = safe;
        }
        for s in &stops {
            prop_assert!(!text.contains(s.as_str()));
        }
    }
}
