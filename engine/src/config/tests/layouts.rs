//! Layouts and flags.

use super::*;

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
