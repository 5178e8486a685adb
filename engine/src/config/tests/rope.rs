//! RoPE settings in every spelling.

use super::*;

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
