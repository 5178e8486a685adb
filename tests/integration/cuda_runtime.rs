//! The actor runtime on the CUDA backend: greedy speculative output equals plain greedy
//! output on the GPU (draft model and prompt lookup, fixed and adaptive draft lengths),
//! on fixture layouts and on the shipped model pair; sampled generation, warped on the
//! device, repeats for a seed. Without a GPU every test prints
//! `skipped: no CUDA device (...)` and passes.
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use falconer::engine::error::BackendError;
use falconer::engine::sampling::SamplingParams;
use falconer::{Device, Runtime, RuntimeError, Speculation};

use crate::common::{fixtures, generate, greedy, reference, tokio_rt};

/// A runtime on GPU 0, or None (after printing why) when there is none.
async fn gpu_runtime(target: PathBuf, draft: PathBuf) -> Option<Runtime> {
    match Runtime::builder()
        .target(target)
        .draft(draft)
        .device(Device::Cuda(0))
        .block_size(16)
        .build()
        .await
    {
        Ok(rt) => Some(rt),
        Err(RuntimeError::Backend(BackendError::Unavailable { reason, .. })) => {
            println!("skipped: no CUDA device ({reason})");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// The shipped model pair on GPU 0 and the README's prompt.
async fn shipped_pair() -> Option<(Runtime, Vec<u32>)> {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/models");
    let rt = gpu_runtime(models.join("falcon-mini"), models.join("falcon-mini-draft")).await?;
    let prompt = rt.tokenizer().encode("def fibonacci(n):\n").unwrap();
    Some((rt, prompt))
}

#[test]
fn cuda_greedy_speculative_equals_plain_on_fixtures() {
    tokio_rt().block_on(async {
        for (target, draft) in [
            ("new_arch_gqa_sharded", "falcon7b_mqa"),
            ("falcon7b_mqa", "sequential"),
            ("rope_yarn", "f16_weights"),
        ] {
            let Some(rt) = gpu_runtime(fixtures().join(target), fixtures().join(draft)).await
            else {
                return;
            };
            let r = reference(target);
            let plain = greedy(&rt, &r.prompt_ids, 32, Speculation::Off, None).await;
            let mut rejected = 0;
            for k in [None, Some(1), Some(3), Some(5), Some(8)] {
                for spec in [Speculation::DraftModel, Speculation::PromptLookup] {
                    let s = greedy(&rt, &r.prompt_ids, 32, spec, k).await;
                    assert_eq!(s.ids, plain.ids, "{target} {spec:?} k={k:?}");
                    rejected += s.usage.draft_tokens_proposed - s.usage.draft_tokens_accepted;
                }
            }
            assert!(
                rejected > 10,
                "{target}: only {rejected} rejected drafts, rollback not exercised"
            );
            println!("{target}: speculative == plain on the GPU ({rejected} rejected drafts)");
        }
    });
}

#[test]
fn cuda_greedy_speculative_equals_plain_on_the_shipped_pair() {
    tokio_rt().block_on(async {
        let Some((rt, prompt)) = shipped_pair().await else {
            return;
        };
        let plain = greedy(&rt, &prompt, 128, Speculation::Off, None).await;
        for k in [None, Some(2), Some(4), Some(6)] {
            let s = greedy(&rt, &prompt, 128, Speculation::DraftModel, k).await;
            assert_eq!(s.ids, plain.ids, "k={k:?}");
            println!(
                "shipped pair k={k:?}: acceptance {:.3}, {:.2} tokens/pass",
                s.usage.acceptance_rate().unwrap_or(0.0),
                s.usage.tokens_per_pass()
            );
        }
    });
}

#[test]
fn cuda_sampled_generation_warps_on_the_device_and_repeats_for_a_seed() {
    tokio_rt().block_on(async {
        let Some((rt, prompt)) = shipped_pair().await else {
            return;
        };
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed: 5,
        };
        // A fixed draft length: the adaptive policy follows measured timings, and another
        // k consumes the random stream differently (the same distribution, another sample).
        let run = |spec| generate(&rt, &prompt, 96, spec, Some(3), params);
        for spec in [Speculation::Off, Speculation::DraftModel] {
            let a = run(spec).await;
            let b = run(spec).await;
            assert_eq!(a.ids.len(), 96, "{spec:?}");
            // Fixed-point masses: the same distributions, bit for bit, every run.
            assert_eq!(a.ids, b.ids, "{spec:?}: a seed gave two outputs");
            if spec == Speculation::DraftModel {
                assert!(
                    a.usage.draft_tokens_accepted > 0,
                    "no sampled draft accepted: {:?}",
                    a.usage
                );
            }
            println!(
                "sampled {spec:?}: acceptance {:.3}, {:.2} tokens/pass",
                a.usage.acceptance_rate().unwrap_or(0.0),
                a.usage.tokens_per_pass()
            );
        }
    });
}

#[test]
fn cuda_greedy_with_a_repetition_penalty_speculative_equals_plain() {
    tokio_rt().block_on(async {
        let Some((rt, prompt)) = shipped_pair().await else {
            return;
        };
        let params = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 1.3,
            ..SamplingParams::default()
        };
        let run = |spec, k| generate(&rt, &prompt, 96, spec, k, params);
        let plain = run(Speculation::Off, None).await;
        let unpenalised = greedy(&rt, &prompt, 96, Speculation::Off, None).await;
        assert_ne!(plain.ids, unpenalised.ids, "the penalty changed nothing");
        for k in [None, Some(2), Some(4)] {
            let s = run(Speculation::DraftModel, k).await;
            assert_eq!(s.ids, plain.ids, "k={k:?}");
        }
        println!("penalised greedy: speculative == plain on the GPU");
    });
}

/// A target split over pipeline shards by device gives the one-shard output on the GPU,
/// plain and speculative: two shards on GPU 0 (the hidden state stays on the device),
/// and, where a second GPU exists, one shard on each (the hidden state crosses through
/// the host).
#[test]
fn cuda_pipeline_shards_by_device_give_the_one_shard_output() {
    tokio_rt().block_on(async {
        let name = "new_arch_gqa_sharded";
        let Some(one) = gpu_runtime(fixtures().join(name), fixtures().join("falcon7b_mqa")).await
        else {
            return;
        };
        let r = reference(name);
        let plain = greedy(&one, &r.prompt_ids, 32, Speculation::Off, None).await;
        let mut placements = vec![[Device::Cuda(0), Device::Cuda(0)]];
        match falconer::engine::backend::cuda::CudaBackend::new(1) {
            Ok(_) => placements.push([Device::Cuda(0), Device::Cuda(1)]),
            Err(e) => println!("skipped the two-GPU case: no second CUDA device ({e})"),
        }
        for devices in placements {
            let rt = Runtime::builder()
                .target(fixtures().join(name))
                .draft(fixtures().join("falcon7b_mqa"))
                .shard_devices(devices)
                .block_size(16)
                .load_progress(None)
                .build()
                .await
                .unwrap();
            assert_eq!(rt.info().devices, devices);
            for (spec, k) in [(Speculation::Off, None), (Speculation::DraftModel, Some(3))] {
                let s = greedy(&rt, &r.prompt_ids, 32, spec, k).await;
                assert_eq!(s.ids, plain.ids, "{devices:?} {spec:?}");
            }
        }
    });
}
