//! config.json.

use super::*;

// ---------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------

#[test]
fn missing_config() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("config.json");
    fs::remove_file(&path).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Io { path: p, source } if *p == path && source.kind() == ErrorKind::NotFound),
        "{e:?}"
    );
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn config_is_not_json() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("config.json");
    fs::write(&path, "{\"model_type\": \"falcon\",").unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Json { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn unknown_rope_scaling_type() {
    let tmp = copy_fixture("legacy_refinedweb");
    let path = edit_json(tmp.path(), "config.json", |v| {
        v["rope_scaling"] = json!({"type": "longrope", "factor": 2.0});
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::UnknownRopeType { path: p, rope_type } if *p == path && rope_type == "longrope"),
        "{e:?}"
    );

    let tmp = copy_fixture("rope_yarn");
    let path = edit_json(tmp.path(), "config.json", |v| {
        v["rope_parameters"]["rope_type"] = json!("su");
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::UnknownRopeType { path: p, rope_type } if *p == path && rope_type == "su"),
        "{e:?}"
    );
}

#[test]
fn heads_do_not_divide_hidden() {
    let tmp = copy_fixture(SHARDED);
    let path = edit_json(tmp.path(), "config.json", |v| {
        v["num_attention_heads"] = json!(5);
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::HeadsDoNotDivideHidden { path: p, hidden_size: 48, num_heads: 5 } if *p == path),
        "{e:?}"
    );
}

#[test]
fn kv_heads_do_not_divide_heads() {
    let tmp = copy_fixture(SHARDED);
    let path = edit_json(tmp.path(), "config.json", |v| {
        v["num_kv_heads"] = json!(4);
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::KvHeadsDoNotDivideHeads { path: p, num_heads: 6, num_kv_heads: 4 } if *p == path),
        "{e:?}"
    );
}

#[test]
fn kv_head_count_that_divides_but_does_not_match_the_weights() {
    // 6 heads in 3 groups is a valid config, but the checkpoint's qkv has 2 groups.
    let tmp = copy_fixture(SHARDED);
    edit_json(tmp.path(), "config.json", |v| v["num_kv_heads"] = json!(3));
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::TensorShape { tensor, expected, found, .. }
            if tensor == "transformer.h.0.self_attention.query_key_value.weight"
                && expected == &[3 * (2 + 2) * 8, 48]
                && found == &[2 * (3 + 2) * 8, 48]),
        "{e:?}"
    );
}
