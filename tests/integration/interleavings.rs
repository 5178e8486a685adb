//! Property test: random interleavings of submit, cancel, drop and collect through one
//! runtime with a KV cache too small for everything at once. Every request that runs to
//! its end gets exactly its solo output, a cancelled one a prefix of it, and when the
//! dust settles no KV block is held in either pool.

use std::time::Duration;

use falconer::{FinishReason, GenerateRequest, GenerationStream, Runtime, Speculation};
use proptest::prelude::*;

use crate::common::{fixture_dir, prompts, tokio_rt};

const TARGET: &str = "new_arch_gqa_sharded";
const DRAFT: &str = "falcon7b_mqa";
const MAX_NEW: usize = 24;

#[derive(Debug, Clone)]
enum Op {
    Submit {
        prompt: usize,
        n: usize,
        spec: usize,
    },
    Cancel(usize),
    Drop(usize),
    Collect(usize),
    Pause(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize, 1..=MAX_NEW, 0..3usize).prop_map(|(prompt, n, spec)| Op::Submit { prompt, n, spec }),
        1 => (0..16usize).prop_map(Op::Cancel),
        1 => (0..16usize).prop_map(Op::Drop),
        1 => (0..16usize).prop_map(Op::Collect),
        1 => (0..4u64).prop_map(Op::Pause),
    ]
}

async fn build(kv_blocks: usize) -> Runtime {
    Runtime::builder()
        .target(fixture_dir(TARGET))
        .draft(fixture_dir(DRAFT))
        .block_size(4)
        .kv_blocks(kv_blocks, kv_blocks)
        .build()
        .await
        .unwrap()
}

/// Each prompt's plain greedy continuation of MAX_NEW tokens, from an unconstrained runtime.
fn solo_outputs() -> Vec<Vec<u32>> {
    tokio_rt().block_on(async {
        let rt = build(256).await;
        let mut out = Vec::new();
        for p in prompts(TARGET) {
            let req = GenerateRequest::ids(p)
                .max_new_tokens(MAX_NEW)
                .speculation(Speculation::Off)
                .eos(vec![]);
            out.push(rt.generate(req).await.unwrap().collect().await.unwrap().ids);
        }
        out
    })
}

struct Live {
    prompt: usize,
    n: usize,
    cancelled: bool,
    stream: GenerationStream,
}

/// Reads a stream to its end and checks the result against the solo output.
async fn check(live: Live, solo: &[Vec<u32>]) -> Result<(), TestCaseError> {
    let want = &solo[live.prompt][..live.n];
    let f = live
        .stream
        .collect()
        .await
        .map_err(|e| TestCaseError::fail(format!("request failed: {e}")))?;
    match f.reason {
        FinishReason::MaxNewTokens => prop_assert_eq!(&f.ids, want),
        FinishReason::Cancelled => {
            prop_assert!(live.cancelled, "cancelled without being asked");
            prop_assert!(
                want.starts_with(&f.ids),
                "cancelled output is not a prefix of the solo output"
            );
        }
        other => prop_assert!(false, "unexpected finish {other:?}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_submit_cancel_drop_leaks_no_kv_and_keeps_outputs(ops in prop::collection::vec(op(), 1..24)) {
        static SOLO: std::sync::OnceLock<Vec<Vec<u32>>> = std::sync::OnceLock::new();
        let solo = SOLO.get_or_init(solo_outputs);
        let ps = prompts(TARGET);
        tokio_rt().block_on(async {
            // 24 blocks of 4 positions: one request (at most 34 + 24 positions) always
            // fits alone, a handful together do not, so requests wait and get preempted.
            let rt = build(24).await;
            let mut live: Vec<Option<Live>> = Vec::new();
            for op in ops {
                match op {
                    Op::Submit { prompt, n, spec } => {
                        let spec = [Speculation::Off, Speculation::DraftModel, Speculation::PromptLookup][spec];
                        let req = GenerateRequest::ids(ps[prompt].clone()).max_new_tokens(n).speculation(spec).eos(vec![]);
                        let stream = rt.generate(req).await.unwrap();
                        live.push(Some(Live { prompt, n, cancelled: false, stream }));
                    }
                    Op::Cancel(i) => {
                        if let Some(Some(l)) = live.get_mut(i) {
                            l.stream.cancel();
                            l.cancelled = true;
                        }
                    }
                    Op::Drop(i) => {
                        if let Some(slot) = live.get_mut(i) {
                            slot.take();
                        }
                    }
                    Op::Collect(i) => {
                        if let Some(l) = live.get_mut(i).and_then(Option::take) {
                            check(l, solo).await?;
                        }
                    }
                    Op::Pause(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                }
            }
            for l in live.into_iter().flatten() {
                check(l, solo).await?;
            }
            // Dropped streams are cancelled by a message; give the scheduler a moment.
            let mut st = rt.stats().await.unwrap();
            for _ in 0..100 {
                if st.active == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                st = rt.stats().await.unwrap();
            }
            prop_assert_eq!((st.active, st.waiting, st.kv.target_used, st.kv.draft_used), (0, 0, 0, 0));
            Ok(())
        })?;
    }
}
