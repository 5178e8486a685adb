//! Real checkpoints' config.json files.

use super::*;
use crate::quant::WeightFormat;

// ---------------------------------------------------------------------------------------
// Real checkpoints
// ---------------------------------------------------------------------------------------

/// tiiuae/falcon-7b `config.json` as transformers writes it.
pub(super) fn falcon_7b() -> Value {
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
pub(super) fn falcon_40b() -> Value {
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
pub(super) fn falcon_180b() -> Value {
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
        stored_weights: WeightFormat::Checkpoint,
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

/// `falconer_weights` names a quantized checkpoint's format; absent means floats, and
/// anything but a format string is refused naming the key.
#[test]
fn stored_weight_formats_are_read_and_checked() {
    assert_eq!(ok(&base()).stored_weights, WeightFormat::Checkpoint);
    for (text, want) in [
        ("int8", WeightFormat::Int8),
        ("int4", WeightFormat::INT4),
        ("int4:g32", WeightFormat::Int4 { group: 32 }),
    ] {
        let mut v = base();
        v["falconer_weights"] = json!(text);
        assert_eq!(ok(&v).stored_weights, want, "{text}");
    }
    for bad in [json!("int4:g10"), json!(8), json!("fp8")] {
        let mut v = base();
        v["falconer_weights"] = bad.clone();
        match err(&v) {
            LoadError::InvalidField { field, .. } => assert_eq!(field, "falconer_weights"),
            e => panic!("{bad}: {e:?}"),
        }
    }
}
