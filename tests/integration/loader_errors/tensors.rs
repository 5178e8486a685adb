//! Tensors: missing, extra, wrong shape or dtype.

use super::*;

// ---------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------

#[test]
fn missing_tensor() {
    let tmp = copy_fixture(SINGLE);
    let name = "transformer.h.1.mlp.dense_4h_to_h.weight";
    let file = edit_safetensors(tmp.path(), "model.safetensors", |f| f.remove(name));
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::MissingTensor { path, tensor } if tensor == name && *path == file),
        "{e:?}"
    );
    assert!(e.to_string().contains(name), "{e}");
}

#[test]
fn missing_norm_tensor() {
    let tmp = copy_fixture(SINGLE);
    let name = "transformer.ln_f.bias";
    edit_safetensors(tmp.path(), "model.safetensors", |f| f.remove(name));
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::MissingTensor { tensor, .. } if tensor == name),
        "{e:?}"
    );
}

#[test]
fn missing_tensor_in_sharded_checkpoint() {
    // Gone from both the shard and the index: the loader notices when it asks for it.
    let tmp = copy_fixture(SHARDED);
    let name = "transformer.h.1.self_attention.dense.weight";
    let shard = shard_of(tmp.path(), name);
    edit_safetensors(tmp.path(), &shard, |f| f.remove(name));
    edit_json(tmp.path(), "model.safetensors.index.json", |v| {
        v["weight_map"].as_object_mut().unwrap().remove(name);
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::MissingTensor { tensor, .. } if tensor == name),
        "{e:?}"
    );
}

#[test]
fn sequential_config_over_parallel_weights_misses_post_attention_norm() {
    // A config that does not match the checkpoint: the layout needs a tensor the file
    // does not have.
    let tmp = copy_fixture(SINGLE);
    edit_json(tmp.path(), "config.json", |v| {
        v["parallel_attn"] = json!(false)
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::MissingTensor { path, tensor }
            if tensor == "transformer.h.0.post_attention_layernorm.weight"
                && *path == tmp.path().join("model.safetensors")),
        "{e:?}"
    );
}

#[test]
fn untied_head_without_lm_head() {
    let tmp = copy_fixture(SINGLE);
    edit_json(tmp.path(), "config.json", |v| {
        v["tie_word_embeddings"] = json!(false);
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::MissingTensor { tensor, .. } if tensor == "lm_head.weight"),
        "{e:?}"
    );
}

#[test]
fn extra_tensor() {
    let tmp = copy_fixture(SINGLE);
    let name = "transformer.h.2.input_layernorm.weight";
    let file = edit_safetensors(tmp.path(), "model.safetensors", |f| f.add_f32(name, &[32]));
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::UnexpectedTensor { path, tensor } if tensor == name && *path == file),
        "{e:?}"
    );
    assert!(e.to_string().contains(name), "{e}");
}

#[test]
fn tensor_of_another_layout_is_unexpected() {
    // ln_attn belongs to the new decoder, not to the 7B layout of this config.
    let tmp = copy_fixture(SINGLE);
    let name = "transformer.h.0.ln_attn.weight";
    edit_safetensors(tmp.path(), "model.safetensors", |f| f.add_f32(name, &[32]));
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::UnexpectedTensor { tensor, .. } if tensor == name),
        "{e:?}"
    );
}

#[test]
fn ignorable_buffers_are_accepted() {
    let tmp = copy_fixture(SINGLE);
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        f.add_f32("transformer.h.0.self_attention.rotary_emb.inv_freq", &[4]);
        f.add_f32("transformer.h.1.self_attention.maybe_masked_bias", &[1]);
    });
    load(tmp.path()).unwrap();
}

#[test]
fn extra_tensor_in_shard_but_not_in_index() {
    let tmp = copy_fixture(SHARDED);
    let file = "model-00002-of-00004.safetensors";
    let name = "transformer.h.0.extra.weight";
    let path = edit_safetensors(tmp.path(), file, |f| f.add_f32(name, &[48]));
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::UnexpectedTensor { path: p, tensor } if tensor == name && *p == path),
        "{e:?}"
    );
    assert!(matches!(
        load_err(tmp.path()),
        LoadError::UnexpectedTensor { .. }
    ));
}

#[test]
fn extra_tensor_in_shard_and_index() {
    let tmp = copy_fixture(SHARDED);
    let file = "model-00004-of-00004.safetensors";
    let name = "transformer.h.7.ln_attn.weight";
    let path = edit_safetensors(tmp.path(), file, |f| f.add_f32(name, &[48]));
    edit_json(tmp.path(), "model.safetensors.index.json", |v| {
        v["weight_map"][name] = json!(file);
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::UnexpectedTensor { path: p, tensor } if tensor == name && *p == path),
        "{e:?}"
    );
}

#[test]
fn wrong_shape_transposed() {
    let tmp = copy_fixture(SINGLE);
    let name = "transformer.h.0.self_attention.query_key_value.weight";
    let file = edit_safetensors(tmp.path(), "model.safetensors", |f| {
        f.tensor_mut(name).shape = vec![32, 48];
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::TensorShape { path, tensor, expected, found }
            if tensor == name && *path == file && expected == &[48, 32] && found == &[32, 48]),
        "{e:?}"
    );
}

#[test]
fn wrong_shape_multi_head_qkv_for_multi_query_config() {
    // A multi-head qkv ([3 * hidden, hidden]) where the 7B layout stores one kv head.
    let tmp = copy_fixture(SINGLE);
    let name = "transformer.h.1.self_attention.query_key_value.weight";
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        let t = f.tensor_mut(name);
        t.shape = vec![96, 32];
        t.data = vec![0; 96 * 32 * 4];
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::TensorShape { tensor, expected, found, .. }
            if tensor == name && expected == &[48, 32] && found == &[96, 32]),
        "{e:?}"
    );
}

#[test]
fn wrong_shape_in_shard() {
    let tmp = copy_fixture(SHARDED);
    let name = "transformer.word_embeddings.weight";
    let shard = shard_of(tmp.path(), name);
    let file = edit_safetensors(tmp.path(), &shard, |f| {
        let t = f.tensor_mut(name);
        t.shape = vec![383, 48];
        t.data.truncate(383 * 48 * 4);
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::TensorShape { path, tensor, expected, found }
            if tensor == name && *path == file && expected == &[384, 48] && found == &[383, 48]),
        "{e:?}"
    );
}

#[test]
fn wrong_dtype() {
    let tmp = copy_fixture(SINGLE);
    let name = "transformer.ln_f.weight";
    let file = edit_safetensors(tmp.path(), "model.safetensors", |f| {
        f.tensor_mut(name).dtype = "I32".into();
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::TensorDtype { path, tensor, dtype }
            if tensor == name && *path == file && dtype == "I32"),
        "{e:?}"
    );
}

#[test]
fn wrong_dtype_f64() {
    let tmp = copy_fixture(SINGLE);
    let name = "transformer.h.0.self_attention.dense.weight";
    edit_safetensors(tmp.path(), "model.safetensors", |f| {
        let t = f.tensor_mut(name);
        t.dtype = "F64".into();
        let doubled: Vec<u8> = t.data.iter().flat_map(|&b| [b, b]).collect();
        t.data = doubled;
    });
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::TensorDtype { tensor, dtype, .. } if tensor == name && dtype == "F64"),
        "{e:?}"
    );
}
