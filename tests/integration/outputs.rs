//! `Falcon::outputs` on the CPU: each chunk of a pass gets its rows in the form it asked
//! for, and a sampled chunk's distributions are the host warp of its own logits with the
//! repetition penalty over its history and its tokens so far.

use falconer_engine::error::{Error, ForwardError};
use falconer_engine::sampling::{argmax, warp_penalised, SamplingParams};
use falconer_engine::{RowsOut, RowsWanted, SeqWork};

use crate::common::{cpu_runner, reference};

fn work(seq: u64, tokens: &[u32]) -> SeqWork<'_> {
    SeqWork {
        seq,
        tokens,
        all_logits: true,
    }
}

#[test]
fn outputs_answer_each_chunk_as_asked() {
    let r = reference("falcon7b_mqa");
    let prompt = &r.prompt_ids;
    let mut m = cpu_runner("falcon7b_mqa");
    for seq in 0..=3 {
        m.add_sequence(seq).unwrap();
    }
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.9,
        repetition_penalty: 1.3,
        seed: 0,
    };
    // A history holding every row's argmax (twice), so that the penalty moves each row.
    let first = m
        .forward_outputs(&[work(0, prompt)], &[RowsWanted::Greedy])
        .unwrap();
    let RowsOut::Greedy(top) = &first[0] else {
        panic!("greedy tokens expected: {first:?}");
    };
    let history: Vec<u32> = top.iter().chain(top).map(|t| t.unwrap()).collect();
    let wants = [
        RowsWanted::Logits,
        RowsWanted::Greedy,
        RowsWanted::Warped {
            params: &params,
            history: &history,
        },
    ];
    let out = m
        .forward_outputs(&[work(1, prompt), work(2, prompt), work(3, prompt)], &wants)
        .unwrap();
    let [RowsOut::Logits(logits), RowsOut::Greedy(greedy), RowsOut::Warped(warped)] = &out[..]
    else {
        panic!("outputs not in the asked forms: {out:?}");
    };
    assert_eq!(logits.num_rows(), prompt.len());
    assert_eq!(greedy.len(), prompt.len());
    assert_eq!(warped.len(), prompt.len());
    for (i, row) in logits.rows().enumerate() {
        assert_eq!(greedy[i], Some(argmax(row)), "row {i}");
        // Row i predicts the token after prompt[i]: the penalty sees the history and
        // the chunk through prompt[i].
        let mut ctx = history.to_vec();
        ctx.extend_from_slice(&prompt[..=i]);
        let want = warp_penalised(row, &ctx, &params).unwrap();
        assert_eq!(warped[i].as_ref().unwrap(), &want, "row {i}");
        // The penalty matters here: without it the distribution differs.
        let plain = warp_penalised(row, &[], &params).unwrap();
        assert_ne!(plain, want, "row {i}: the penalty changed nothing");
    }
}

#[test]
fn outputs_need_one_want_per_chunk() {
    let r = reference("falcon7b_mqa");
    let mut m = cpu_runner("falcon7b_mqa");
    m.add_sequence(1).unwrap();
    let err = m
        .forward_outputs(
            &[work(1, &r.prompt_ids)],
            &[RowsWanted::Greedy, RowsWanted::Logits],
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Forward(ForwardError::WantsPerChunk {
                wants: 2,
                chunks: 1
            })
        ),
        "{err:?}"
    );
    // Nothing was cached by the failed pass.
    assert_eq!(m.cached_len(1).unwrap(), 0);
}
