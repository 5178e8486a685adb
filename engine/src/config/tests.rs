#![allow(clippy::unwrap_used)]
//! `config.json` normalisation: every Falcon layout, both RoPE spellings, and every
//! refusal as a typed [`LoadError`] that names the file.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{FalconConfig, LayerNorms, RopeConfig, RopeScaling};
use crate::error::LoadError;

fn parse_str(text: &str) -> Result<FalconConfig, LoadError> {
    FalconConfig::from_json_str(text, Path::new("config.json"))
}

fn parse(v: &Value) -> Result<FalconConfig, LoadError> {
    parse_str(&v.to_string())
}

fn ok(v: &Value) -> FalconConfig {
    match parse(v) {
        Ok(cfg) => cfg,
        Err(e) => panic!("config rejected: {e}\n{v:#}"),
    }
}

fn err(v: &Value) -> LoadError {
    match parse(v) {
        Ok(cfg) => panic!("config accepted: {cfg:?}\n{v:#}"),
        Err(e) => e,
    }
}

/// A small valid config (7B-style: multi-query, shared norm, parallel attention).
fn base() -> Value {
    json!({
        "model_type": "falcon",
        "vocab_size": 384,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4
    })
}

/// `base()` with some keys replaced or added.
fn with(pairs: Value) -> Value {
    let mut v = base();
    for (k, x) in pairs.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// `base()` without a key.
fn without(key: &str) -> Value {
    let mut v = base();
    v.as_object_mut().unwrap().remove(key);
    v
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

fn yarn_of(cfg: &FalconConfig) -> (f64, usize, f64, f64, f64, bool) {
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

// ---------------------------------------------------------------------------------------
// Real checkpoints
// ---------------------------------------------------------------------------------------

/// tiiuae/falcon-7b `config.json` as transformers writes it.
fn falcon_7b() -> Value {
    json!({
        "alibi": false,
        "apply_residual_connection_post_layernorm": false,
        "architectures": ["FalconForCausalLM"],
        "attention_dropout": 0.0,
        "bias": false,
        "bos_token_id": 11,
        "eos_token_id": 11,
        "hidden_dropout": 0.0,
        "hidden_size": 4544,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "falcon",
        "multi_query": true,
        "new_decoder_architecture": false,
        "num_attention_heads": 71,
        "num_hidden_layers": 32,
        "parallel_attn": true,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.27.4",
        "use_cache": true,
        "vocab_size": 65024
    })
}

/// tiiuae/falcon-40b.
fn falcon_40b() -> Value {
    json!({
        "alibi": false,
        "apply_residual_connection_post_layernorm": false,
        "architectures": ["FalconForCausalLM"],
        "attention_dropout": 0.0,
        "bias": false,
        "bos_token_id": 11,
        "eos_token_id": 11,
        "hidden_dropout": 0.0,
        "hidden_size": 8192,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "falcon",
        "new_decoder_architecture": true,
        "num_attention_heads": 128,
        "num_hidden_layers": 60,
        "num_kv_heads": 8,
        "parallel_attn": true,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.27.4",
        "use_cache": true,
        "vocab_size": 65024
    })
}

/// tiiuae/falcon-180B.
fn falcon_180b() -> Value {
    json!({
        "alibi": false,
        "architectures": ["FalconForCausalLM"],
        "attention_dropout": 0.0,
        "bias": false,
        "bos_token_id": 11,
        "eos_token_id": 11,
        "hidden_dropout": 0.0,
        "hidden_size": 14848,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "max_position_embeddings": 2048,
        "model_type": "falcon",
        "multi_query": true,
        "new_decoder_architecture": true,
        "num_attention_heads": 232,
        "num_hidden_layers": 80,
        "num_kv_heads": 8,
        "parallel_attn": true,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.32.0",
        "use_cache": true,
        "vocab_size": 65024
    })
}

#[test]
fn falcon_7b_is_multi_query_with_shared_norm() {
    let cfg = ok(&falcon_7b());
    let want = FalconConfig {
        vocab_size: 65024,
        hidden_size: 4544,
        num_layers: 32,
        num_heads: 71,
        num_kv_heads: 1,
        head_dim: 64,
        ffn_hidden_size: 4 * 4544,
        layer_norm_epsilon: 1e-5,
        layer_norms: LayerNorms::Shared,
        new_decoder_architecture: false,
        bias: false,
        alibi: false,
        rope: RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None,
        },
        max_position_embeddings: 2048,
        bos_token_id: Some(11),
        eos_token_ids: vec![11],
        tie_word_embeddings: true,
    };
    assert_eq!(cfg, want);
    assert_eq!(cfg.queries_per_kv(), 71);
    assert_eq!(cfg.qkv_rows(), (71 + 2) * 64);
    assert_eq!(cfg.kv_bytes_per_token(2), 2 * 32 * 64 * 2);
}

#[test]
fn falcon_7b_stores_one_kv_head_whatever_num_kv_heads_says() {
    // transformers writes num_kv_heads = num_attention_heads when the key was absent;
    // the 7B attention still stores exactly one key/value head.
    let mut v = falcon_7b();
    v["num_kv_heads"] = json!(71);
    let cfg = ok(&v);
    assert_eq!(cfg.num_kv_heads, 1);
    assert_eq!(cfg.qkv_rows(), 4672);
    assert_eq!(cfg.kv_bytes_per_token(2), 8192);

    // Even a kv count that does not divide the heads is ignored for multi-query.
    v["num_kv_heads"] = json!(5);
    assert_eq!(ok(&v).num_kv_heads, 1);
    // multi_query defaults to true.
    v.as_object_mut().unwrap().remove("multi_query");
    assert_eq!(ok(&v).num_kv_heads, 1);
}

#[test]
fn falcon_40b_is_grouped_with_separate_norms() {
    let cfg = ok(&falcon_40b());
    assert!(cfg.new_decoder_architecture);
    assert_eq!(cfg.num_heads, 128);
    assert_eq!(cfg.num_kv_heads, 8);
    assert_eq!(cfg.head_dim, 64);
    assert_eq!(cfg.queries_per_kv(), 16);
    assert_eq!(cfg.qkv_rows(), 8 * (16 + 2) * 64);
    assert_eq!(cfg.layer_norms, LayerNorms::Separate);
    assert_eq!(cfg.ffn_hidden_size, 4 * 8192);
    assert_eq!(cfg.num_layers, 60);
    assert_eq!(cfg.kv_bytes_per_token(2), 2 * 60 * 8 * 64 * 2);
}

#[test]
fn falcon_180b_shape() {
    let cfg = ok(&falcon_180b());
    assert!(cfg.new_decoder_architecture);
    assert_eq!(cfg.hidden_size, 14848);
    assert_eq!(cfg.num_layers, 80);
    assert_eq!(cfg.num_heads, 232);
    assert_eq!(cfg.num_kv_heads, 8);
    assert_eq!(cfg.head_dim, 64);
    assert_eq!(cfg.queries_per_kv(), 29);
    assert_eq!(cfg.qkv_rows(), 8 * (29 + 2) * 64);
    assert_eq!(cfg.qkv_rows(), 15872);
    assert_eq!(cfg.kv_bytes_per_token(2), 2 * 80 * 8 * 64 * 2);
    assert_eq!(cfg.kv_bytes_per_token(2), 163_840);
    assert_eq!(cfg.kv_bytes_per_token(4), 2 * cfg.kv_bytes_per_token(2));
    assert_eq!(cfg.layer_norms, LayerNorms::Separate);
    // rope_scaling: null is plain RoPE.
    assert_eq!(
        cfg.rope,
        RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None
        }
    );
    assert_eq!(cfg.bos_token_id, Some(11));
    assert_eq!(cfg.eos_token_ids, vec![11]);
}

// ---------------------------------------------------------------------------------------
// Layouts and flags
// ---------------------------------------------------------------------------------------

#[test]
fn new_architecture_kv_heads_default_to_heads() {
    let cfg = ok(&with(json!({"new_decoder_architecture": true})));
    assert_eq!(cfg.num_kv_heads, 4);
    assert_eq!(cfg.queries_per_kv(), 1);
    assert_eq!(cfg.qkv_rows(), 4 * 3 * 8);
    assert_eq!(cfg.layer_norms, LayerNorms::Separate);
}

#[test]
fn new_architecture_groups_and_norm_count() {
    let cfg = ok(&with(
        json!({"new_decoder_architecture": true, "num_kv_heads": 2}),
    ));
    assert_eq!(cfg.num_kv_heads, 2);
    assert_eq!(cfg.queries_per_kv(), 2);
    assert_eq!(cfg.qkv_rows(), 2 * (2 + 2) * 8);
    assert_eq!(cfg.layer_norms, LayerNorms::Separate);
    // multi_query is irrelevant to the new architecture.
    let cfg = ok(&with(
        json!({"new_decoder_architecture": true, "num_kv_heads": 2, "multi_query": false}),
    ));
    assert_eq!(cfg.num_kv_heads, 2);

    let two = ok(&with(json!({
        "new_decoder_architecture": true, "num_kv_heads": 2, "num_ln_in_parallel_attn": 2
    })));
    assert_eq!(two.layer_norms, LayerNorms::Separate);
    let one = ok(&with(json!({
        "new_decoder_architecture": true, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1
    })));
    assert_eq!(one.layer_norms, LayerNorms::Shared);
    let null = ok(&with(json!({
        "new_decoder_architecture": true, "num_ln_in_parallel_attn": null
    })));
    assert_eq!(null.layer_norms, LayerNorms::Separate);
}

#[test]
fn num_ln_in_parallel_attn_other_than_one_or_two_is_invalid() {
    let e = err(&with(
        json!({"new_decoder_architecture": true, "num_ln_in_parallel_attn": 3}),
    ));
    assert!(
        matches!(&e, LoadError::InvalidField { field: "num_ln_in_parallel_attn", value, .. } if value == "3"),
        "{e:?}"
    );
}

#[test]
fn parallel_attn_false_is_sequential() {
    let cfg = ok(&with(json!({"parallel_attn": false})));
    assert_eq!(cfg.layer_norms, LayerNorms::Sequential);
    assert_eq!(cfg.num_kv_heads, 1);
    let cfg = ok(&with(json!({"parallel_attn": false, "multi_query": false})));
    assert_eq!(cfg.layer_norms, LayerNorms::Sequential);
    assert_eq!(cfg.num_kv_heads, 4);
}

#[test]
fn multi_head_stores_one_kv_head_per_query_head() {
    let cfg = ok(&with(json!({"multi_query": false})));
    assert_eq!(cfg.num_kv_heads, 4);
    assert_eq!(cfg.qkv_rows(), 3 * 32);
    // transformers writes num_kv_heads = num_attention_heads; that is consistent.
    let cfg = ok(&with(json!({"multi_query": false, "num_kv_heads": 4})));
    assert_eq!(cfg.num_kv_heads, 4);
}

#[test]
fn multi_head_with_a_different_kv_count_is_refused() {
    let e = err(&with(json!({"multi_query": false, "num_kv_heads": 2})));
    assert!(
        matches!(
            &e,
            LoadError::KvHeadsDoNotDivideHeads {
                num_heads: 4,
                num_kv_heads: 2,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn bias_alibi_tie_and_numbers() {
    let cfg = ok(&with(json!({
        "bias": true,
        "alibi": true,
        "tie_word_embeddings": false,
        "ffn_hidden_size": 96,
        "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": 4096
    })));
    assert!(cfg.bias);
    assert!(cfg.alibi);
    assert!(!cfg.tie_word_embeddings);
    assert_eq!(cfg.ffn_hidden_size, 96);
    assert_eq!(cfg.layer_norm_epsilon, 1e-6);
    assert_eq!(cfg.max_position_embeddings, 4096);

    let defaults = ok(&base());
    assert!(!defaults.bias);
    assert!(!defaults.alibi);
    assert!(defaults.tie_word_embeddings);
    assert_eq!(defaults.ffn_hidden_size, 128);
    assert_eq!(defaults.layer_norm_epsilon, 1e-5);
    assert_eq!(defaults.max_position_embeddings, 2048);
    assert_eq!(defaults.layer_norms, LayerNorms::Shared);
    assert_eq!(defaults.bos_token_id, None);
    assert!(defaults.eos_token_ids.is_empty());
}

#[test]
fn alibi_allows_odd_head_dim_but_rope_does_not() {
    // hidden 36 / 4 heads = head_dim 9.
    let cfg = ok(&with(json!({"hidden_size": 36, "alibi": true})));
    assert_eq!(cfg.head_dim, 9);
    let e = err(&with(json!({"hidden_size": 36})));
    assert!(matches!(&e, LoadError::Unsupported { .. }), "{e:?}");
}

#[test]
fn model_type_defaults_to_falcon() {
    let cfg = ok(&without("model_type"));
    assert!(!cfg.new_decoder_architecture);
    assert_eq!(cfg.num_kv_heads, 1);
}

// ---------------------------------------------------------------------------------------
// Legacy RefinedWeb keys
// ---------------------------------------------------------------------------------------

#[test]
fn legacy_refinedweb_model_is_the_7b_decoder() {
    // tiiuae/falcon-7b's original remote-code config.
    let v = json!({
        "alibi": false,
        "apply_residual_connection_post_layernorm": false,
        "architectures": ["RWForCausalLM"],
        "bias": false,
        "bos_token_id": 11,
        "eos_token_id": 11,
        "n_embed": 4544,
        "n_head": 71,
        "n_layer": 32,
        "layer_norm_epsilon": 1e-05,
        "model_type": "RefinedWebModel",
        "multi_query": true,
        "parallel_attn": true,
        "vocab_size": 65024
    });
    let legacy = ok(&v);
    assert_eq!(legacy, ok(&falcon_7b()));
    assert!(!legacy.new_decoder_architecture);
    assert_eq!(legacy.num_kv_heads, 1);
    assert_eq!(legacy.hidden_size, 4544);
    assert_eq!(legacy.num_heads, 71);
    assert_eq!(legacy.num_layers, 32);
}

#[test]
fn legacy_refinedweb_model_ignores_n_head_kv() {
    let v = json!({
        "model_type": "RefinedWebModel",
        "vocab_size": 384,
        "hidden_size": 32,
        "n_head": 4,
        "n_head_kv": 4,
        "n_layer": 2
    });
    let cfg = ok(&v);
    assert!(!cfg.new_decoder_architecture);
    assert_eq!(cfg.num_kv_heads, 1);
    assert_eq!(cfg.layer_norms, LayerNorms::Shared);
}

#[test]
fn legacy_refinedweb_is_the_new_decoder() {
    // tiiuae/falcon-40b's original remote-code config.
    let v = json!({
        "alibi": false,
        "apply_residual_connection_post_layernorm": false,
        "architectures": ["RWForCausalLM"],
        "bias": false,
        "bos_token_id": 11,
        "eos_token_id": 11,
        "hidden_size": 8192,
        "layer_norm_epsilon": 1e-05,
        "model_type": "RefinedWeb",
        "n_head": 128,
        "n_head_kv": 8,
        "n_layer": 60,
        "parallel_attn": true,
        "vocab_size": 65024
    });
    let legacy = ok(&v);
    assert_eq!(legacy, ok(&falcon_40b()));
    assert!(legacy.new_decoder_architecture);
    assert_eq!(legacy.num_kv_heads, 8);
    assert_eq!(legacy.layer_norms, LayerNorms::Separate);

    // An explicit key wins over the model type.
    let mut v = v;
    v["new_decoder_architecture"] = json!(false);
    let cfg = ok(&v);
    assert!(!cfg.new_decoder_architecture);
    assert_eq!(cfg.num_kv_heads, 1);
}

#[test]
fn new_keys_win_over_legacy_keys() {
    let cfg = ok(&json!({
        "vocab_size": 384,
        "hidden_size": 64,
        "n_embed": 32,
        "num_hidden_layers": 3,
        "n_layer": 2,
        "num_attention_heads": 8,
        "n_head": 4,
        "new_decoder_architecture": true,
        "num_kv_heads": 2,
        "n_head_kv": 4
    }));
    assert_eq!(cfg.hidden_size, 64);
    assert_eq!(cfg.num_layers, 3);
    assert_eq!(cfg.num_heads, 8);
    assert_eq!(cfg.num_kv_heads, 2);
    // null new key falls back to the legacy one.
    let cfg = ok(&json!({
        "vocab_size": 384,
        "hidden_size": null,
        "n_embed": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4
    }));
    assert_eq!(cfg.hidden_size, 32);
}

// ---------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------

#[test]
fn rope_defaults() {
    assert_eq!(
        ok(&base()).rope,
        RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None
        }
    );
    let cfg = ok(&with(json!({"rope_theta": 500_000.0})));
    assert_eq!(cfg.rope.theta, 500_000.0);
    assert_eq!(cfg.rope.scaling, RopeScaling::None);
}

#[test]
fn rope_scaling_with_type_key() {
    let cfg = ok(&with(json!({
        "rope_theta": 20_000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0}
    })));
    assert_eq!(
        cfg.rope,
        RopeConfig {
            theta: 20_000.0,
            scaling: RopeScaling::Linear { factor: 2.0 }
        }
    );
}

#[test]
fn rope_scaling_with_rope_type_key() {
    let cfg = ok(&with(json!({
        "max_position_embeddings": 1024,
        "rope_scaling": {"rope_type": "dynamic", "factor": 4}
    })));
    assert_eq!(
        cfg.rope,
        RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::Dynamic {
                factor: 4.0,
                max_position_embeddings: 1024
            }
        }
    );
    // rope_type wins over type when both are present.
    let cfg = ok(&with(json!({
        "rope_scaling": {"rope_type": "linear", "type": "dynamic", "factor": 3.0}
    })));
    assert_eq!(cfg.rope.scaling, RopeScaling::Linear { factor: 3.0 });
    // "default" and a missing type are plain RoPE.
    let cfg = ok(&with(json!({"rope_scaling": {"rope_type": "default"}})));
    assert_eq!(cfg.rope.scaling, RopeScaling::None);
    let cfg = ok(&with(json!({"rope_scaling": {}})));
    assert_eq!(cfg.rope.scaling, RopeScaling::None);
}

#[test]
fn transformers_5_rope_parameters() {
    let cfg = ok(&with(json!({
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}
    })));
    assert_eq!(
        cfg.rope,
        RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None
        }
    );
    let cfg = ok(&with(json!({
        "rope_parameters": {"rope_theta": 500.0, "rope_type": "linear", "factor": 2.0}
    })));
    assert_eq!(
        cfg.rope,
        RopeConfig {
            theta: 500.0,
            scaling: RopeScaling::Linear { factor: 2.0 }
        }
    );
    let cfg = ok(&with(json!({
        "max_position_embeddings": 16,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0}
    })));
    assert_eq!(
        cfg.rope.scaling,
        RopeScaling::Dynamic {
            factor: 2.0,
            max_position_embeddings: 16
        }
    );
}

#[test]
fn rope_parameters_win_over_legacy_keys() {
    let cfg = ok(&with(json!({
        "rope_theta": 1234.0,
        "rope_scaling": {"type": "dynamic", "factor": 8.0},
        "rope_parameters": {"rope_theta": 500.0, "rope_type": "linear", "factor": 2.0}
    })));
    assert_eq!(
        cfg.rope,
        RopeConfig {
            theta: 500.0,
            scaling: RopeScaling::Linear { factor: 2.0 }
        }
    );
    // Theta missing from rope_parameters falls back to the top-level key.
    let cfg = ok(&with(json!({
        "rope_theta": 1234.0,
        "rope_parameters": {"rope_type": "linear", "factor": 2.0}
    })));
    assert_eq!(cfg.rope.theta, 1234.0);
    // A null rope_parameters leaves rope_scaling in charge.
    let cfg = ok(&with(json!({
        "rope_parameters": null,
        "rope_scaling": {"type": "linear", "factor": 2.0}
    })));
    assert_eq!(cfg.rope.scaling, RopeScaling::Linear { factor: 2.0 });
}

#[test]
fn yarn_defaults() {
    let cfg = ok(&with(json!({
        "max_position_embeddings": 2048,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0}
    })));
    let (factor, original, attention, beta_fast, beta_slow, truncate) = yarn_of(&cfg);
    assert_eq!(factor, 4.0);
    assert_eq!(original, 2048);
    assert!(close(attention, 0.1 * 4.0f64.ln() + 1.0), "{attention}");
    assert_eq!(beta_fast, 32.0);
    assert_eq!(beta_slow, 1.0);
    assert!(truncate);
}

#[test]
fn yarn_explicit_parameters() {
    let cfg = ok(&with(json!({
        "max_position_embeddings": 64,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 500.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "attention_factor": 1.5,
            "beta_fast": 16,
            "beta_slow": 2.0,
            "truncate": false
        }
    })));
    assert_eq!(cfg.rope.theta, 500.0);
    assert_eq!(yarn_of(&cfg), (4.0, 16, 1.5, 16.0, 2.0, false));
}

#[test]
fn yarn_factor_from_positions_when_missing() {
    let cfg = ok(&with(json!({
        "max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "yarn", "original_max_position_embeddings": 16}
    })));
    let (factor, original, attention, ..) = yarn_of(&cfg);
    assert_eq!(factor, 4.0);
    assert_eq!(original, 16);
    assert!(close(attention, 0.1 * 4.0f64.ln() + 1.0), "{attention}");
}

#[test]
fn yarn_attention_factor_from_mscale() {
    let cfg = ok(&with(json!({
        "rope_scaling": {
            "type": "yarn",
            "factor": 40.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.707
        }
    })));
    let (factor, _, attention, ..) = yarn_of(&cfg);
    assert_eq!(factor, 40.0);
    let m = |s: f64| 0.1 * s * 40.0f64.ln() + 1.0;
    assert!(close(attention, m(1.0) / m(0.707)), "{attention}");

    // Equal mscales cancel out.
    let cfg = ok(&with(json!({
        "rope_scaling": {"type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    })));
    assert!(close(yarn_of(&cfg).2, 1.0));

    // mscale alone (or a zero mscale_all_dim) is the plain default.
    for extra in [
        json!({"mscale": 0.5}),
        json!({"mscale": 1.0, "mscale_all_dim": 0}),
    ] {
        let mut scaling = json!({"type": "yarn", "factor": 40.0});
        for (k, x) in extra.as_object().unwrap() {
            scaling[k] = x.clone();
        }
        let cfg = ok(&with(json!({ "rope_scaling": scaling })));
        assert!(close(yarn_of(&cfg).2, m(1.0)), "{extra}");
    }

    // An explicit attention_factor wins over mscale.
    let cfg = ok(&with(json!({
        "rope_scaling": {
            "type": "yarn",
            "factor": 40.0,
            "attention_factor": 0.9,
            "mscale": 1.0,
            "mscale_all_dim": 0.707
        }
    })));
    assert_eq!(yarn_of(&cfg).2, 0.9);
}

#[test]
fn yarn_factor_one_has_unit_attention_factor() {
    let cfg = ok(&with(
        json!({"rope_scaling": {"type": "yarn", "factor": 1.0}}),
    ));
    assert_eq!(yarn_of(&cfg).2, 1.0);
}

#[test]
fn yarn_non_bool_truncate_is_invalid() {
    let e = err(&with(
        json!({"rope_scaling": {"type": "yarn", "factor": 2.0, "truncate": "yes"}}),
    ));
    assert!(
        matches!(
            &e,
            LoadError::InvalidField {
                field: "truncate",
                ..
            }
        ),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Token ids
// ---------------------------------------------------------------------------------------

#[test]
fn eos_token_id_int_or_list() {
    let cfg = ok(&with(json!({"eos_token_id": 11, "bos_token_id": 1})));
    assert_eq!(cfg.eos_token_ids, vec![11]);
    assert_eq!(cfg.bos_token_id, Some(1));
    let cfg = ok(&with(json!({"eos_token_id": [11, 193, 7]})));
    assert_eq!(cfg.eos_token_ids, vec![11, 193, 7]);
    let cfg = ok(&with(json!({"eos_token_id": [], "bos_token_id": null})));
    assert!(cfg.eos_token_ids.is_empty());
    assert_eq!(cfg.bos_token_id, None);
    let cfg = ok(&with(json!({"bos_token_id": [3, 4]})));
    assert_eq!(cfg.bos_token_id, Some(3));
}

#[test]
fn bad_token_ids_are_invalid() {
    for bad in [json!(-1), json!("11"), json!([11, "x"]), json!(1u64 << 40)] {
        let e = err(&with(json!({ "eos_token_id": bad.clone() })));
        assert!(
            matches!(
                &e,
                LoadError::InvalidField {
                    field: "eos_token_id",
                    ..
                }
            ),
            "{bad}: {e:?}"
        );
    }
    let e = err(&with(json!({"bos_token_id": 1.5})));
    assert!(
        matches!(
            &e,
            LoadError::InvalidField {
                field: "bos_token_id",
                ..
            }
        ),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

#[test]
fn invalid_json() {
    for text in ["", "{", "{\"vocab_size\": 3,}", "not json"] {
        let e = parse_str(text).unwrap_err();
        assert!(
            matches!(&e, LoadError::Json { path, .. } if path == Path::new("config.json")),
            "{text:?}: {e:?}"
        );
    }
}

#[test]
fn root_must_be_an_object() {
    for text in ["[]", "3", "null", "\"falcon\""] {
        let e = parse_str(text).unwrap_err();
        assert!(
            matches!(
                &e,
                LoadError::InvalidField {
                    field: "(root)",
                    ..
                }
            ),
            "{text}: {e:?}"
        );
    }
}

#[test]
fn missing_required_fields() {
    let cases = [
        ("vocab_size", "vocab_size"),
        ("hidden_size", "hidden_size"),
        ("num_hidden_layers", "num_hidden_layers"),
        ("num_attention_heads", "num_attention_heads"),
    ];
    for (key, field) in cases {
        let e = err(&without(key));
        assert!(
            matches!(&e, LoadError::MissingField { path, field: f } if *f == field && path == Path::new("config.json")),
            "{key}: {e:?}"
        );
    }
    // null counts as missing.
    let e = err(&with(json!({"vocab_size": null})));
    assert!(
        matches!(
            &e,
            LoadError::MissingField {
                field: "vocab_size",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn wrongly_typed_or_zero_sizes_are_invalid() {
    let cases = [
        (json!({"vocab_size": -3}), "vocab_size"),
        (json!({"vocab_size": 3.5}), "vocab_size"),
        (json!({"hidden_size": "32"}), "hidden_size"),
        (json!({"num_hidden_layers": 0}), "num_hidden_layers"),
        (json!({"num_attention_heads": 0}), "num_attention_heads"),
        (json!({"vocab_size": 0}), "vocab_size"),
        (
            json!({"num_kv_heads": 0, "new_decoder_architecture": true}),
            "num_kv_heads",
        ),
        (json!({"num_kv_heads": 0}), "num_kv_heads"),
        (json!({"multi_query": "yes"}), "multi_query"),
        (json!({"parallel_attn": 1}), "parallel_attn"),
        (json!({"bias": "false"}), "bias"),
        (json!({"alibi": 0}), "alibi"),
        (
            json!({"new_decoder_architecture": "true"}),
            "new_decoder_architecture",
        ),
        (json!({"tie_word_embeddings": []}), "tie_word_embeddings"),
        (json!({"layer_norm_epsilon": "1e-5"}), "layer_norm_epsilon"),
        (json!({"ffn_hidden_size": -1}), "ffn_hidden_size"),
        (
            json!({"max_position_embeddings": 1.5}),
            "max_position_embeddings",
        ),
    ];
    for (patch, field) in cases {
        let e = err(&with(patch.clone()));
        assert!(
            matches!(&e, LoadError::InvalidField { field: f, .. } if *f == field),
            "{patch}: {e:?}"
        );
    }
}

#[test]
fn zero_layers() {
    let e = err(&with(json!({"num_hidden_layers": 0})));
    assert!(
        matches!(&e, LoadError::InvalidField { field: "num_hidden_layers", value, .. } if value == "0"),
        "{e:?}"
    );
    let e = err(&json!({
        "model_type": "RefinedWebModel",
        "vocab_size": 384,
        "hidden_size": 32,
        "n_head": 4,
        "n_layer": 0
    }));
    assert!(
        matches!(
            &e,
            LoadError::InvalidField {
                field: "num_hidden_layers",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn heads_must_divide_hidden() {
    let e = err(&with(json!({"hidden_size": 30})));
    assert!(
        matches!(
            &e,
            LoadError::HeadsDoNotDivideHidden {
                hidden_size: 30,
                num_heads: 4,
                ..
            }
        ),
        "{e:?}"
    );
    // Falcon-7B's 71 heads into a 4544 hidden size, off by one.
    let mut v = falcon_7b();
    v["hidden_size"] = json!(4545);
    let e = err(&v);
    assert!(
        matches!(
            &e,
            LoadError::HeadsDoNotDivideHidden {
                hidden_size: 4545,
                num_heads: 71,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn kv_heads_must_divide_heads() {
    let e = err(&with(
        json!({"new_decoder_architecture": true, "num_kv_heads": 3}),
    ));
    assert!(
        matches!(
            &e,
            LoadError::KvHeadsDoNotDivideHeads {
                num_heads: 4,
                num_kv_heads: 3,
                ..
            }
        ),
        "{e:?}"
    );
    let mut v = falcon_180b();
    v["num_kv_heads"] = json!(7);
    let e = err(&v);
    assert!(
        matches!(
            &e,
            LoadError::KvHeadsDoNotDivideHeads {
                num_heads: 232,
                num_kv_heads: 7,
                ..
            }
        ),
        "{e:?}"
    );
    // More kv heads than heads.
    let e = err(&with(
        json!({"new_decoder_architecture": true, "num_kv_heads": 8}),
    ));
    assert!(
        matches!(
            &e,
            LoadError::KvHeadsDoNotDivideHeads {
                num_heads: 4,
                num_kv_heads: 8,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn unknown_rope_type() {
    for (key, spelling) in [
        ("rope_scaling", "type"),
        ("rope_scaling", "rope_type"),
        ("rope_parameters", "rope_type"),
    ] {
        let e = err(&with(
            json!({ key: { spelling: "longrope", "factor": 2.0 } }),
        ));
        assert!(
            matches!(&e, LoadError::UnknownRopeType { path, rope_type } if rope_type == "longrope" && path == Path::new("config.json")),
            "{key}.{spelling}: {e:?}"
        );
    }
    let e = err(&with(
        json!({"rope_scaling": {"type": "llama3", "factor": 8.0}}),
    ));
    assert!(
        matches!(&e, LoadError::UnknownRopeType { rope_type, .. } if rope_type == "llama3"),
        "{e:?}"
    );
}

#[test]
fn bad_rope_factor() {
    for kind in ["linear", "dynamic", "yarn"] {
        for bad in [
            json!(0.5),
            json!(0),
            json!(-2.0),
            json!("two"),
            json!([2.0]),
            json!(true),
        ] {
            let e = err(&with(
                json!({"rope_scaling": {"type": kind, "factor": bad.clone()}}),
            ));
            assert!(
                matches!(
                    &e,
                    LoadError::InvalidField {
                        field: "factor",
                        ..
                    }
                ),
                "{kind} factor {bad}: {e:?}"
            );
        }
    }
    let e = err(&with(
        json!({"rope_scaling": {"type": "linear", "factor": "two"}}),
    ));
    assert!(
        matches!(&e, LoadError::InvalidField { field: "factor", value, .. } if value == "\"two\""),
        "{e:?}"
    );
    let e = err(&with(
        json!({"rope_scaling": {"type": "linear", "factor": 0.5}}),
    ));
    assert!(
        matches!(&e, LoadError::InvalidField { field: "factor", value, .. } if value == "0.5"),
        "{e:?}"
    );
}

#[test]
fn missing_factor_for_linear_and_dynamic() {
    for kind in ["linear", "dynamic"] {
        let e = err(&with(json!({"rope_scaling": {"type": kind}})));
        assert!(
            matches!(&e, LoadError::InvalidField { field: "factor", value, .. } if value == "missing"),
            "{kind}: {e:?}"
        );
    }
}

#[test]
fn bad_rope_theta_and_shape() {
    for bad in [json!(0.0), json!(1.0), json!(-5.0), json!("10000")] {
        let e = err(&with(json!({ "rope_theta": bad.clone() })));
        assert!(
            matches!(
                &e,
                LoadError::InvalidField {
                    field: "rope_theta",
                    ..
                }
            ),
            "{bad}: {e:?}"
        );
        let e = err(&with(
            json!({"rope_parameters": {"rope_theta": bad.clone()}}),
        ));
        assert!(
            matches!(
                &e,
                LoadError::InvalidField {
                    field: "rope_theta",
                    ..
                }
            ),
            "{bad}: {e:?}"
        );
    }
    let e = err(&with(json!({"rope_scaling": "linear"})));
    assert!(
        matches!(&e, LoadError::InvalidField { field: "rope_scaling", value, .. } if value == "\"linear\""),
        "{e:?}"
    );
    let e = err(&with(
        json!({"rope_scaling": {"type": "yarn", "factor": 2.0, "beta_fast": "x"}}),
    ));
    assert!(
        matches!(
            &e,
            LoadError::InvalidField {
                field: "beta_fast",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn new_architecture_without_parallel_attention_is_unsupported() {
    let e = err(&with(
        json!({"new_decoder_architecture": true, "parallel_attn": false}),
    ));
    assert!(
        matches!(&e, LoadError::Unsupported { path, .. } if path == Path::new("config.json")),
        "{e:?}"
    );
    let mut v = falcon_40b();
    v["parallel_attn"] = json!(false);
    v["num_ln_in_parallel_attn"] = json!(1);
    assert!(matches!(err(&v), LoadError::Unsupported { .. }));
}

#[test]
fn activation_other_than_gelu_is_unsupported() {
    for act in ["relu", "gelu_new", "silu"] {
        let e = err(&with(json!({ "activation": act })));
        assert!(
            matches!(&e, LoadError::Unsupported { path, .. } if path == Path::new("config.json")),
            "{act}: {e:?}"
        );
    }
    assert!(parse(&with(json!({"activation": "gelu"}))).is_ok());
}

#[test]
fn wrong_model_type() {
    for mt in ["llama", "Falcon", "refinedweb", "mistral"] {
        let e = err(&with(json!({ "model_type": mt })));
        assert!(
            matches!(&e, LoadError::InvalidField { field: "model_type", value, .. } if value == &format!("\"{mt}\"")),
            "{mt}: {e:?}"
        );
    }
}

#[test]
fn every_error_names_the_file() {
    let path = PathBuf::from("/models/falcon-test/config.json");
    let texts: Vec<String> = [
        with(json!({"vocab_size": null})),
        with(json!({"num_hidden_layers": 0})),
        with(json!({"hidden_size": 30})),
        with(json!({"new_decoder_architecture": true, "num_kv_heads": 3})),
        with(json!({"rope_scaling": {"type": "longrope"}})),
        with(json!({"rope_scaling": {"type": "linear", "factor": 0.5}})),
        with(json!({"rope_scaling": {"type": "linear", "factor": "x"}})),
        with(json!({"new_decoder_architecture": true, "parallel_attn": false})),
        with(json!({"activation": "relu"})),
        with(json!({"model_type": "llama"})),
        with(json!({"eos_token_id": "x"})),
        with(json!({"rope_theta": 0})),
    ]
    .iter()
    .map(Value::to_string)
    .chain(["{".to_string(), "[1]".to_string()])
    .collect();
    for text in texts {
        let e = FalconConfig::from_json_str(&text, &path).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("/models/falcon-test/config.json"),
            "{text}: {shown}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Formerly known library bugs (fixed; kept as regression tests)
// ---------------------------------------------------------------------------------------

#[test]
fn huge_hidden_size_is_an_error_not_a_panic() {
    let v = json!({
        "vocab_size": 384,
        "hidden_size": 1u64 << 62,
        "num_hidden_layers": 2,
        "num_attention_heads": 1
    });
    let r = std::panic::catch_unwind(|| parse(&v).map(|c| c.qkv_rows()));
    assert!(matches!(r, Ok(Err(_))), "panicked or accepted");
}

#[test]
fn yarn_original_max_position_embeddings_must_be_positive() {
    for bad in [json!(0), json!(-16)] {
        let r = parse(&with(json!({
            "rope_parameters": {"rope_type": "yarn", "original_max_position_embeddings": bad.clone()}
        })));
        assert!(
            matches!(
                &r,
                Err(LoadError::InvalidField {
                    field: "original_max_position_embeddings",
                    ..
                })
            ),
            "{bad}: {r:?}"
        );
    }
}

#[test]
fn null_or_non_string_rope_type_does_not_drop_scaling() {
    for scaling in [
        json!({"type": "linear", "rope_type": null, "factor": 2.0}),
        json!({"rope_type": 5, "factor": 2.0}),
    ] {
        let r = parse(&with(json!({ "rope_scaling": scaling.clone() })));
        assert!(
            !matches!(&r, Ok(cfg) if cfg.rope.scaling == RopeScaling::None),
            "{scaling}: scaling silently dropped"
        );
    }
}
