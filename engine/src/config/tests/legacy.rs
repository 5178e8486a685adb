//! Legacy RefinedWeb keys.

use super::checkpoints::{falcon_40b, falcon_7b};
use super::*;

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
