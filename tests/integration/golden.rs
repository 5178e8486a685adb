//! The CPU backend against HF transformers on every fixture layout: prefill and decode
//! logits within 1e-4 relative, greedy continuations identical, verify passes equal to
//! one-at-a-time decoding, and truncate-then-redecode equal to never having decoded.

use falconer_engine::SeqWork;

use crate::common::{cpu_runner, reference, rel_err, LAYOUTS};

const TOL: f32 = 1e-4;

#[test]
fn prefill_and_decode_logits_match_transformers() {
    for &name in LAYOUTS {
        let r = reference(name);
        let mut m = cpu_runner(name);
        m.add_sequence(1).unwrap();
        let pre = m
            .forward(&[SeqWork {
                seq: 1,
                tokens: &r.prompt_ids,
                all_logits: true,
            }])
            .unwrap();
        assert_eq!(pre[0].num_rows(), r.prompt_ids.len());
        for (i, want) in r.prefill_logits.iter().enumerate() {
            let e = rel_err(pre[0].row(i), want);
            assert!(e < TOL, "{name}: prefill row {i} rel err {e}");
        }
        for (i, want) in r.decode_step_logits.iter().enumerate() {
            let out = m
                .forward(&[SeqWork {
                    seq: 1,
                    tokens: &[r.greedy_ids[i]],
                    all_logits: false,
                }])
                .unwrap();
            let e = rel_err(out[0].last(), want);
            assert!(e < TOL, "{name}: decode step {i} rel err {e}");
        }
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    for &name in LAYOUTS {
        let r = reference(name);
        let mut m = cpu_runner(name);
        let got = m.greedy(7, &r.prompt_ids, r.greedy_ids.len()).unwrap();
        assert_eq!(got, r.greedy_ids, "{name}");
        assert_eq!(m.pool().used_blocks(), 0, "{name}: blocks leaked");
    }
}

#[test]
fn verify_pass_equals_one_token_at_a_time() {
    for &name in LAYOUTS {
        let r = reference(name);
        let mut m = cpu_runner(name);
        let new = &r.greedy_ids[..6];
        // Sequence 1: prompt, then six tokens in one verify call.
        m.add_sequence(1).unwrap();
        m.forward(&[SeqWork {
            seq: 1,
            tokens: &r.prompt_ids,
            all_logits: false,
        }])
        .unwrap();
        let verify = m
            .forward(&[SeqWork {
                seq: 1,
                tokens: new,
                all_logits: true,
            }])
            .unwrap();
        // Sequence 2: prompt, then the same tokens one by one.
        m.add_sequence(2).unwrap();
        m.forward(&[SeqWork {
            seq: 2,
            tokens: &r.prompt_ids,
            all_logits: false,
        }])
        .unwrap();
        for (i, t) in new.iter().enumerate() {
            let one = m
                .forward(&[SeqWork {
                    seq: 2,
                    tokens: &[*t],
                    all_logits: false,
                }])
                .unwrap();
            let e = rel_err(verify[0].row(i), one[0].last());
            assert!(
                e < 1e-5,
                "{name}: verify row {i} differs from decode by {e}"
            );
        }
    }
}

#[test]
fn truncate_then_redecode_equals_never_decoded() {
    for &name in LAYOUTS {
        let r = reference(name);
        let mut m = cpu_runner(name);
        m.add_sequence(1).unwrap();
        m.forward(&[SeqWork {
            seq: 1,
            tokens: &r.prompt_ids,
            all_logits: false,
        }])
        .unwrap();
        let n = r.prompt_ids.len();
        // Decode five wrong tokens (rejected drafts), roll back, decode the right one.
        m.forward(&[SeqWork {
            seq: 1,
            tokens: &[3, 5, 7, 11, 13],
            all_logits: true,
        }])
        .unwrap();
        m.truncate(1, n).unwrap();
        assert_eq!(m.cached_len(1).unwrap(), n);
        let out = m
            .forward(&[SeqWork {
                seq: 1,
                tokens: &[r.greedy_ids[0]],
                all_logits: false,
            }])
            .unwrap();
        let e = rel_err(out[0].last(), &r.decode_step_logits[0]);
        assert!(e < TOL, "{name}: after truncate rel err {e}");
    }
}

#[test]
fn batched_sequences_match_their_solo_runs() {
    // Two sequences with different lengths in one forward pass give the logits each
    // gets alone.
    let name = "new_arch_gqa_sharded";
    let r = reference(name);
    let mut m = cpu_runner(name);
    m.add_sequence(1).unwrap();
    m.add_sequence(2).unwrap();
    let short = &r.prompt_ids[..9];
    let out = m
        .forward(&[
            SeqWork {
                seq: 1,
                tokens: &r.prompt_ids,
                all_logits: true,
            },
            SeqWork {
                seq: 2,
                tokens: short,
                all_logits: true,
            },
        ])
        .unwrap();
    for (i, want) in r.prefill_logits.iter().enumerate() {
        assert!(rel_err(out[0].row(i), want) < TOL);
    }
    for (i, want) in r.prefill_logits[..9].iter().enumerate() {
        assert!(rel_err(out[1].row(i), want) < TOL);
    }
}

/// `forward_greedy` gives each row's argmax of the logits `forward` gives, for prefill
/// and verify rows alike.
#[test]
fn greedy_pass_equals_argmax_of_logits() {
    for &name in LAYOUTS {
        let r = reference(name);
        let mut m = cpu_runner(name);
        m.add_sequence(1).unwrap();
        m.add_sequence(2).unwrap();
        let all = |seq| SeqWork {
            seq,
            tokens: &r.prompt_ids,
            all_logits: true,
        };
        let logits = m.forward(&[all(1)]).unwrap();
        let ids = m.forward_greedy(&[all(2)]).unwrap();
        let want: Vec<Option<u32>> = (0..logits[0].num_rows())
            .map(|i| Some(falconer_engine::sampling::argmax(logits[0].row(i))))
            .collect();
        assert_eq!(ids[0], want, "{name}");
        assert_eq!(ids[0].len(), r.prompt_ids.len(), "{name}");
    }
}
