//! Decode and verify steps replayed as CUDA graphs give the bits of the same steps
//! queued kernel by kernel, across context classes (new recordings) and step shapes, on
//! every fixture layout and on a model split into two pipeline shards (the second
//! recorded with the first's output as its input); a replay re-checks the indices its
//! launchers checked while recording.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use falconer_engine::backend::cuda::kernels::{bf16, ScratchPool, SeqDesc, StepInput};
use falconer_engine::backend::cuda::{CudaBackend, GraphStats};
use falconer_engine::sampling::argmax;
use falconer_engine::{Falcon, LoadOptions, ModelRunner, SeqChunk, SeqWork};

use crate::common::{fixture, LAYOUTS};
use crate::cuda_golden::{backend, cuda_runner, same_bits};

/// Logits of one step, with recording on or off for it.
fn step(
    b: &CudaBackend,
    m: &mut ModelRunner<CudaBackend>,
    graphs: bool,
    tokens: &[u32],
    all: bool,
) -> Vec<Vec<f32>> {
    b.set_step_graphs(graphs);
    let out = m
        .forward(&[SeqWork {
            seq: 1,
            tokens,
            all_logits: all,
        }])
        .unwrap();
    b.set_step_graphs(true);
    out[0].rows().map(<[f32]>::to_vec).collect()
}

/// Whether two sets of rows hold the same values bit for bit.
fn same_rows(a: &[Vec<f32>], b: &[Vec<f32>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_bits(x, y))
}

/// Greedy decoding of 150 tokens with a three-token verify pass every tenth step, on a
/// model whose steps are recorded and on one whose are not: every step's logits must be
/// the same bits. Returns the recording model's statistics.
pub(crate) fn replays_match(b: &Arc<CudaBackend>, name: &str) -> Result<GraphStats, String> {
    let mut on = cuda_runner(b, name);
    let mut off = cuda_runner(b, name);
    on.add_sequence(1).unwrap();
    off.add_sequence(1).unwrap();
    let prompt: Vec<u32> = (1..=9).collect();
    let mut last = step(b, &mut on, true, &prompt, false);
    if !same_rows(&last, &step(b, &mut off, false, &prompt, false)) {
        return Err("prefill".into());
    }
    for i in 0..150 {
        let next = argmax(&last[last.len() - 1]) as u32;
        let tokens: Vec<u32> = if i % 10 == 9 {
            vec![next, (next + 1) % 32, (next + 7) % 32]
        } else {
            vec![next]
        };
        let all = tokens.len() > 1;
        last = step(b, &mut on, true, &tokens, all);
        let want = step(b, &mut off, false, &tokens, all);
        if !same_rows(&last, &want) {
            return Err(format!("step {i} ({} tokens)", tokens.len()));
        }
    }
    let off_stats = off.model().step_graphs().stats();
    if off_stats.warmed + off_stats.recorded + off_stats.replayed != 0 {
        return Err(format!("recorded with recording off: {off_stats:?}"));
    }
    if let Some(why) = on.model().step_graphs().last_failure() {
        println!("{name}: a capture failed: {why}");
    }
    Ok(on.model().step_graphs().stats())
}

#[test]
fn cuda_replayed_steps_equal_steps_queued_kernel_by_kernel() {
    let Some(b) = backend() else { return };
    let mut failures = Vec::new();
    for name in LAYOUTS {
        match replays_match(&b, name) {
            Ok(s) => {
                println!("{name}: {s:?}");
                // Contexts from 10 to 180 keys span three context classes, each with a
                // one-token and a three-token shape: six recordings, all but the warm-up
                // and recording steps replayed.
                if s.failed != 0 || s.recorded < 6 || s.replayed < 140 || s.direct != 1 {
                    failures.push(format!("{name}: {s:?}"));
                }
            }
            Err(e) => failures.push(format!("{name}: {e} differs")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The two halves of a model as pipeline shards.
fn shards(b: &Arc<CudaBackend>, name: &str) -> [Falcon<CudaBackend>; 2] {
    let dir = fixture(name);
    let n = dir.config().unwrap().num_layers;
    assert!(n >= 2, "{name} has {n} layers");
    let load = |layers| {
        let opts = LoadOptions {
            layers: Some(layers),
            kv_blocks: 64,
            block_size: 4,
            progress: None,
            weights: Default::default(),
        };
        Falcon::load(&dir, Arc::clone(b), &opts).unwrap()
    };
    [load(0..n / 2), load(n / 2..n)]
}

/// One step through both shards, recording on or off: the logits.
fn shard_step(
    b: &CudaBackend,
    [first, second]: &mut [Falcon<CudaBackend>; 2],
    graphs: bool,
    chunk: SeqChunk<'_>,
) -> Vec<Vec<f32>> {
    b.set_step_graphs(graphs);
    let s1 = first.prepare(&[chunk]).unwrap();
    let hidden = first.run_shard(&s1, None).unwrap();
    let s2 = second.prepare(&[chunk]).unwrap();
    let out = second.run_shard(&s2, Some(hidden)).unwrap();
    let logits = second.logits_from(&out, &s2).unwrap();
    b.set_step_graphs(true);
    logits[0].rows().map(<[f32]>::to_vec).collect()
}

#[test]
fn cuda_replayed_pipeline_shards_equal_shards_queued_kernel_by_kernel() {
    let Some(b) = backend() else { return };
    for name in ["falcon7b_mqa", "new_arch_gqa_sharded"] {
        let mut on = shards(&b, name);
        let mut off = shards(&b, name);
        let blocks: Vec<u32> = (0..64).collect();
        let prompt: Vec<u32> = (1..=9).collect();
        let mut tokens = prompt.clone();
        let mut pos = 0;
        for i in 0..121 {
            let chunk = SeqChunk {
                tokens: &tokens,
                start_pos: pos,
                block_table: &blocks,
                prompt_len: prompt.len(),
                all_logits: tokens.len() > 1 && i > 0,
            };
            let got = shard_step(&b, &mut on, true, chunk);
            let want = shard_step(&b, &mut off, false, chunk);
            assert!(same_rows(&got, &want), "{name}: step {i} differs");
            pos += tokens.len();
            let next = argmax(&got[got.len() - 1]) as u32;
            tokens = if i % 10 == 9 {
                vec![next, (next + 1) % 32, (next + 7) % 32]
            } else {
                vec![next]
            };
        }
        for (part, shard) in on.iter().enumerate() {
            let s = shard.step_graphs().stats();
            println!("{name} shard {part}: {s:?}");
            if let Some(why) = shard.step_graphs().last_failure() {
                println!("{name} shard {part}: a capture failed: {why}");
            }
            // Contexts from 10 to about 155 keys: three classes, one- and three-token
            // steps in each.
            assert!(
                s.failed == 0 && s.recorded >= 5 && s.replayed >= 100,
                "{name} shard {part}: {s:?}"
            );
        }
    }
}

#[test]
fn cuda_a_recorded_embedding_replays_on_each_refreshed_step_and_rechecks_its_indices() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    let (vocab, cols) = (5usize, 8usize);
    // Row t of the table holds t.
    let table: Vec<bf16> = (0..vocab * cols)
        .map(|i| bf16::from_f32((i / cols) as f32))
        .collect();
    let table = gpu.upload(&table).unwrap();
    let blocks = [0u32];
    let upload = |tokens: &[u32]| {
        let slots: Vec<u32> = (0..tokens.len() as u32).collect();
        gpu.upload_step(&StepInput {
            token_ids: tokens,
            slots: &slots,
            rope_cos: &[],
            rope_sin: &[],
            seqs: &[SeqDesc {
                first_row: 0,
                num_rows: tokens.len(),
                start_pos: 0,
                block_table: &blocks,
            }],
            logit_rows: &[0],
            block_size: 4,
        })
        .unwrap()
    };
    let pool = ScratchPool::default();
    let mut recorded = gpu.persistent_step(&upload(&[3])).unwrap();
    let warm = gpu.warm_up(&pool, || gpu.embed(&table, vocab, cols, &recorded));
    drop(warm.unwrap());
    let (out, graph, limits) = gpu
        .record(&pool, || gpu.embed(&table, vocab, cols, &recorded))
        .unwrap();
    // Each replay reads the step copied over the recorded one.
    for t in [4u32, 1, 3] {
        let step = upload(&[t]);
        step.check_limits(&limits).unwrap();
        gpu.refresh_step(&mut recorded, &step).unwrap();
        graph.replay().unwrap();
        assert_eq!(
            gpu.download(&out).unwrap(),
            vec![t as f32; cols],
            "token {t}"
        );
    }
    // The embedding checked token ids against the vocabulary: a replay must too.
    let err = upload(&[5]).check_limits(&limits).unwrap_err();
    assert!(err.to_string().contains("token id 5"), "{err}");
    // A step of another shape is not copied over the recording.
    assert!(gpu.refresh_step(&mut recorded, &upload(&[1, 2])).is_err());
    // Nothing may be allocated while recording: a pool that was not warmed up fails.
    let cold = ScratchPool::default();
    assert!(gpu
        .record(&cold, || gpu.embed(&table, vocab, cols, &recorded))
        .is_err());
}
