#![allow(clippy::unwrap_used)]
//! `config.json` normalisation: every Falcon layout, both RoPE spellings, and every
//! refusal as a typed [`LoadError`] that names the file.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{FalconConfig, LayerNorms, RopeConfig, RopeScaling};
use crate::error::LoadError;

pub(super) fn parse_str(text: &str) -> Result<FalconConfig, LoadError> {
    FalconConfig::from_json_str(text, Path::new("config.json"))
}

pub(super) fn parse(v: &Value) -> Result<FalconConfig, LoadError> {
    parse_str(&v.to_string())
}

pub(super) fn ok(v: &Value) -> FalconConfig {
    match parse(v) {
        Ok(cfg) => cfg,
        Err(e) => panic!("config rejected: {e}\n{v:#}"),
    }
}

pub(super) fn err(v: &Value) -> LoadError {
    match parse(v) {
        Ok(cfg) => panic!("config accepted: {cfg:?}\n{v:#}"),
        Err(e) => e,
    }
}

/// A small valid config (7B-style: multi-query, shared norm, parallel attention).
pub(super) fn base() -> Value {
    json!({
        "model_type": "falcon",
        "vocab_size": 384,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4
    })
}

/// `base()` with some keys replaced or added.
pub(super) fn with(pairs: Value) -> Value {
    let mut v = base();
    for (k, x) in pairs.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// `base()` without a key.
pub(super) fn without(key: &str) -> Value {
    let mut v = base();
    v.as_object_mut().unwrap().remove(key);
    v
}

pub(super) fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

pub(super) fn yarn_of(cfg: &FalconConfig) -> (f64, usize, f64, f64, f64, bool) {
    match cfg.rope.scaling {
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            attention_factor,
            beta_fast,
            beta_slow,
            truncate,
        } => (
            factor,
            original_max_position_embeddings,
            attention_factor,
            beta_fast,
            beta_slow,
            truncate,
        ),
        ref other => panic!("expected yarn, got {other:?}"),
    }
}

mod checkpoints;
mod errors;
mod layouts;
mod legacy;
mod rope;
mod token_ids;
