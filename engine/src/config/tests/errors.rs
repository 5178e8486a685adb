//! Errors, and regression tests of fixed bugs.

use super::checkpoints::{falcon_180b, falcon_40b, falcon_7b};
use super::*;

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
