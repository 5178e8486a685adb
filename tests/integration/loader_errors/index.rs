//! The shard index (model.safetensors.index.json).

use super::*;

// ---------------------------------------------------------------------------------------
// The shard index
// ---------------------------------------------------------------------------------------

#[test]
fn index_points_at_missing_file() {
    let tmp = copy_fixture(SHARDED);
    let name = "transformer.ln_f.weight";
    let index = edit_json(tmp.path(), "model.safetensors.index.json", |v| {
        v["weight_map"][name] = json!("model-00009-of-00004.safetensors");
    });
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::IndexMissingFile { index: i, tensor, file }
            if *i == index && tensor == name && file == "model-00009-of-00004.safetensors"),
        "{e:?}"
    );
    assert!(matches!(
        load_err(tmp.path()),
        LoadError::IndexMissingFile { .. }
    ));
}

#[test]
fn deleted_shard() {
    let tmp = copy_fixture(SHARDED);
    fs::remove_file(tmp.path().join("model-00003-of-00004.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::IndexMissingFile { file, tensor, .. }
            if file == "model-00003-of-00004.safetensors"
                && shard_of(tmp.path(), tensor) == "model-00003-of-00004.safetensors"),
        "{e:?}"
    );
}

#[test]
fn index_may_not_leave_the_model_directory() {
    let tmp = copy_fixture(SHARDED);
    // A real file one level up: still refused.
    let outside = tmp.path().join("sub");
    fs::create_dir(&outside).unwrap();
    fs::copy(
        tmp.path().join("model-00004-of-00004.safetensors"),
        outside.join("model-00004-of-00004.safetensors"),
    )
    .unwrap();
    let model = outside.join("model");
    fs::create_dir(&model).unwrap();
    for entry in fs::read_dir(tmp.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
        }
    }
    for bad in [
        "../model-00004-of-00004.safetensors",
        "/etc/passwd",
        "..",
        "sub\\x.safetensors",
    ] {
        edit_json(&model, "model.safetensors.index.json", |v| {
            v["weight_map"]["transformer.ln_f.bias"] = json!(bad);
        });
        let e = weights_err(&model);
        assert!(
            matches!(&e, LoadError::IndexMissingFile { tensor, file, .. }
                if tensor == "transformer.ln_f.bias" && file == bad),
            "{bad}: {e:?}"
        );
    }
}

#[test]
fn index_names_a_tensor_the_shard_lacks() {
    let tmp = copy_fixture(SHARDED);
    let name = "transformer.h.1.ln_mlp.bias";
    let shard = shard_of(tmp.path(), name);
    let path = edit_safetensors(tmp.path(), &shard, |f| f.remove(name));
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::MissingTensor { path: p, tensor } if tensor == name && *p == path),
        "{e:?}"
    );
    assert!(e.to_string().contains(&shard), "{e}");
    assert!(matches!(
        load_err(tmp.path()),
        LoadError::MissingTensor { .. }
    ));
}

#[test]
fn index_assigns_a_tensor_to_the_wrong_shard() {
    let tmp = copy_fixture(SHARDED);
    let name = "transformer.word_embeddings.weight";
    assert_eq!(
        shard_of(tmp.path(), name),
        "model-00001-of-00004.safetensors"
    );
    edit_json(tmp.path(), "model.safetensors.index.json", |v| {
        v["weight_map"][name] = json!("model-00002-of-00004.safetensors");
    });
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::MissingTensor { path, tensor }
            if tensor == name && *path == tmp.path().join("model-00002-of-00004.safetensors")),
        "{e:?}"
    );
}

#[test]
fn index_without_weight_map() {
    let tmp = copy_fixture(SHARDED);
    let index = edit_json(tmp.path(), "model.safetensors.index.json", |v| {
        v.as_object_mut().unwrap().remove("weight_map");
    });
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::MissingField { path, field: "weight_map" } if *path == index),
        "{e:?}"
    );
}

#[test]
fn index_with_non_string_file() {
    let tmp = copy_fixture(SHARDED);
    let index = edit_json(tmp.path(), "model.safetensors.index.json", |v| {
        v["weight_map"]["transformer.ln_f.bias"] = json!(4);
    });
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::InvalidField { path, field: "weight_map", value } if *path == index && value == "4"),
        "{e:?}"
    );
}

#[test]
fn index_is_not_json() {
    let tmp = copy_fixture(SHARDED);
    let index = tmp.path().join("model.safetensors.index.json");
    fs::write(&index, "{\"weight_map\": {").unwrap();
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Json { path, .. } if *path == index),
        "{e:?}"
    );
}

#[test]
fn no_weights_at_all() {
    let tmp = copy_fixture(SINGLE);
    fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::NoWeights { dir } if dir == tmp.path()),
        "{e:?}"
    );
    assert!(
        e.to_string().contains(&*tmp.path().to_string_lossy()),
        "{e}"
    );

    // Shards without their index are not a checkpoint either.
    let tmp = copy_fixture(SHARDED);
    fs::remove_file(tmp.path().join("model.safetensors.index.json")).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::NoWeights { dir } if dir == tmp.path()),
        "{e:?}"
    );
}
