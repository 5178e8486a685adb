//! Shared helpers: fixture paths, reference files, logit comparison, runtime requests.

use std::path::PathBuf;
use std::sync::Arc;

use falconer::engine::sampling::SamplingParams;
use falconer::{GenerateRequest, Runtime, Speculation};
use falconer_engine::{CpuBackend, Falcon, LoadOptions, ModelDir, ModelRunner};
use serde::Deserialize;

/// Every fixture layout made by tests/fixtures/make_fixtures.py.
pub const LAYOUTS: &[&str] = &[
    "falcon7b_mqa",
    "new_arch_gqa_sharded",
    "new_arch_one_ln",
    "sequential",
    "bias_mha",
    "alibi_rw",
    "rope_linear",
    "rope_dynamic",
    "rope_yarn",
    "bf16_weights",
    "f16_weights",
    "legacy_refinedweb",
];

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn fixture(name: &str) -> ModelDir {
    ModelDir::new(fixtures().join(name))
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub prompt_ids: Vec<u32>,
    pub prefill_logits: Vec<Vec<f32>>,
    pub decode_step_logits: Vec<Vec<f32>>,
    pub greedy_ids: Vec<u32>,
}

pub fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixtures().join(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn cpu_runner(name: &str) -> ModelRunner<CpuBackend> {
    let opts = LoadOptions {
        kv_blocks: 64,
        block_size: 4,
        ..LoadOptions::default()
    };
    let model = Falcon::load(&fixture(name), Arc::new(CpuBackend::new()), &opts).unwrap();
    ModelRunner::new(model)
}

/// A layout's reference prompt as one prefill, then `steps` one-token steps fed the
/// reference's greedy tokens (on sequence 1 of `m`): every prefill row's logits, then
/// each step's.
pub fn prompt_then_steps<B: falconer_engine::Backend>(
    m: &mut ModelRunner<B>,
    r: &Reference,
    steps: usize,
) -> Vec<Vec<f32>> {
    m.add_sequence(1).unwrap();
    let work = |tokens, all_logits| falconer_engine::SeqWork {
        seq: 1,
        tokens,
        all_logits,
    };
    let pre = m.forward(&[work(&r.prompt_ids, true)]).unwrap();
    let mut rows: Vec<Vec<f32>> = pre[0].rows().map(<[f32]>::to_vec).collect();
    for id in &r.greedy_ids[..steps] {
        let out = m.forward(&[work(std::slice::from_ref(id), false)]).unwrap();
        rows.push(out[0].last().to_vec());
    }
    rows
}

/// max |a - b| / max |b| over a row.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// A fixture's directory.
pub fn fixture_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The tokio runtime the actor tests run on.
pub fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Greedy generation of `n` tokens (no EOS stop), with a fixed draft length if given.
pub async fn greedy(
    rt: &Runtime,
    prompt: &[u32],
    n: usize,
    spec: Speculation,
    k: Option<usize>,
) -> falconer::Finished {
    generate(rt, prompt, n, spec, k, SamplingParams::greedy()).await
}

/// [`greedy`] under any sampling parameters.
pub async fn generate(
    rt: &Runtime,
    prompt: &[u32],
    n: usize,
    spec: Speculation,
    k: Option<usize>,
    params: SamplingParams,
) -> falconer::Finished {
    let mut req = GenerateRequest::ids(prompt.to_vec())
        .max_new_tokens(n)
        .speculation(spec)
        .sampling(params)
        .eos(vec![]);
    if let Some(k) = k {
        req = req.draft_len(k);
    }
    rt.generate(req).await.unwrap().collect().await.unwrap()
}

/// Prompts of several lengths cut from a layout's reference prompt and continuation.
pub fn prompts(name: &str) -> Vec<Vec<u32>> {
    let r = reference(name);
    let mut all = r.prompt_ids.clone();
    all.extend_from_slice(&r.greedy_ids);
    vec![
        r.prompt_ids.clone(),
        all[..5].to_vec(),
        all[3..30].to_vec(),
        all[10..44].to_vec(),
    ]
}
