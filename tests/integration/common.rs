//! Shared helpers: fixture paths, reference files, logit comparison.

use std::path::PathBuf;
use std::sync::Arc;

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
