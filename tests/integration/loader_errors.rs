//! Malformed model directories: each case copies a fixture into a temporary directory,
//! breaks one thing, and checks that loading answers with the precise [`LoadError`]
//! (naming the tensor and the file) instead of panicking.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use falconer_engine::checkpoint::GenerationDefaults;
use falconer_engine::error::{ForwardError, LoadError};
use falconer_engine::{CpuBackend, Error, Falcon, LoadOptions, ModelDir, SeqChunk, Tokenizer};
use serde_json::{json, Map, Value};
use tempfile::TempDir;

use crate::common::{fixture, fixtures};

const SINGLE: &str = "falcon7b_mqa";
const SHARDED: &str = "new_arch_gqa_sharded";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A private copy of a fixture directory.
fn copy_fixture(name: &str) -> TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
        }
    }
    tmp
}

fn load_with(dir: &Path, opts: &LoadOptions) -> Result<Falcon<CpuBackend>, LoadError> {
    Falcon::load(&ModelDir::new(dir), Arc::new(CpuBackend::new()), opts)
}

fn load(dir: &Path) -> Result<Falcon<CpuBackend>, LoadError> {
    load_with(dir, &LoadOptions::default())
}

/// The error of a load that must fail.
fn load_err(dir: &Path) -> LoadError {
    match load(dir) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e,
    }
}

fn weights_err(dir: &Path) -> LoadError {
    match ModelDir::new(dir).weights() {
        Ok(_) => panic!("{}: weights opened although broken", dir.display()),
        Err(e) => e,
    }
}

/// One tensor of a safetensors file, as stored.
#[derive(Debug, Clone)]
struct RawTensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// A safetensors file by hand: `__metadata__` plus tensors in data order.
#[derive(Debug, Clone)]
struct RawFile {
    metadata: Option<Value>,
    tensors: Vec<RawTensor>,
}

impl RawFile {
    fn read(path: &Path) -> Self {
        let bytes = fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let mut metadata = None;
        let mut tensors = Vec::new();
        for (name, info) in header {
            if name == "__metadata__" {
                metadata = Some(info);
                continue;
            }
            let offsets: Vec<usize> = serde_json::from_value(info["data_offsets"].clone()).unwrap();
            tensors.push((
                offsets[0],
                RawTensor {
                    name,
                    dtype: info["dtype"].as_str().unwrap().to_string(),
                    shape: serde_json::from_value(info["shape"].clone()).unwrap(),
                    data: data[offsets[0]..offsets[1]].to_vec(),
                },
            ));
        }
        tensors.sort_by_key(|(start, _)| *start);
        RawFile {
            metadata,
            tensors: tensors.into_iter().map(|(_, t)| t).collect(),
        }
    }

    /// Serialises like `safetensors::serialize_to_file`: 8-byte little-endian header
    /// length, JSON header padded with spaces to 8 bytes, then the data.
    fn write(&self, path: &Path) {
        let mut header = Map::new();
        if let Some(m) = &self.metadata {
            header.insert("__metadata__".into(), m.clone());
        }
        let mut offset = 0;
        for t in &self.tensors {
            header.insert(
                t.name.clone(),
                json!({
                    "dtype": t.dtype,
                    "shape": t.shape,
                    "data_offsets": [offset, offset + t.data.len()],
                }),
            );
            offset += t.data.len();
        }
        let mut text = serde_json::to_vec(&header).unwrap();
        // (`is_multiple_of` would need Rust 1.87; the workspace targets 1.85.)
        let padded = text.len().div_ceil(8) * 8;
        text.resize(padded, b' ');
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&text);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
        }
        fs::write(path, out).unwrap();
    }

    fn tensor_mut(&mut self, name: &str) -> &mut RawTensor {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("fixture has no tensor {name}"))
    }

    fn remove(&mut self, name: &str) {
        let before = self.tensors.len();
        self.tensors.retain(|t| t.name != name);
        assert_eq!(
            self.tensors.len() + 1,
            before,
            "fixture has no tensor {name}"
        );
    }

    fn add_f32(&mut self, name: &str, shape: &[usize]) {
        let n: usize = shape.iter().product();
        self.tensors.push(RawTensor {
            name: name.to_string(),
            dtype: "F32".into(),
            shape: shape.to_vec(),
            data: vec![0; 4 * n],
        });
    }
}

/// Rewrites one safetensors file of `dir` through `f`.
fn edit_safetensors(dir: &Path, file: &str, f: impl FnOnce(&mut RawFile)) -> PathBuf {
    let path = dir.join(file);
    let mut raw = RawFile::read(&path);
    f(&mut raw);
    raw.write(&path);
    path
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn write_json(path: &Path, v: &Value) {
    fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// Rewrites a JSON file of `dir` through `f`.
fn edit_json(dir: &Path, file: &str, f: impl FnOnce(&mut Value)) -> PathBuf {
    let path = dir.join(file);
    let mut v = read_json(&path);
    f(&mut v);
    write_json(&path, &v);
    path
}

/// The shard file the index assigns `tensor` to.
fn shard_of(dir: &Path, tensor: &str) -> String {
    let index = read_json(&dir.join("model.safetensors.index.json"));
    index["weight_map"][tensor].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------
// Sanity: the helpers round-trip
// ---------------------------------------------------------------------------------------

#[test]
fn rewritten_fixtures_still_load() {
    let tmp = copy_fixture(SINGLE);
    edit_safetensors(tmp.path(), "model.safetensors", |_| {});
    load(tmp.path()).unwrap();

    let tmp = copy_fixture(SHARDED);
    for i in 1..=4 {
        edit_safetensors(
            tmp.path(),
            &format!("model-0000{i}-of-00004.safetensors"),
            |_| {},
        );
    }
    load(tmp.path()).unwrap();
}

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

// ---------------------------------------------------------------------------------------
// Broken files
// ---------------------------------------------------------------------------------------

#[test]
fn truncated_shard() {
    let tmp = copy_fixture(SHARDED);
    let path = tmp.path().join("model-00003-of-00004.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("model-00003-of-00004.safetensors"),
        "{e}"
    );
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn truncated_inside_header() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..100]).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn padded_file() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("model.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0; 16]);
    fs::write(&path, bytes).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn garbage_header() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("model.safetensors");
    let text = b"this is not a safetensors header";
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text);
    bytes.extend_from_slice(&[0; 64]);
    fs::write(&path, bytes).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn header_length_beyond_the_file() {
    let tmp = copy_fixture(SHARDED);
    let path = tmp.path().join("model-00001-of-00004.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    fs::write(&path, bytes).unwrap();
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
    // An absurd length must not make the loader allocate or panic either.
    let mut bytes = fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    fs::write(&path, bytes).unwrap();
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn file_shorter_than_the_length_prefix() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("model.safetensors");
    fs::write(&path, [1u8, 2, 3]).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn empty_weight_file() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("model.safetensors");
    fs::write(&path, b"").unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn overlapping_offsets() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("model.safetensors");
    let raw = RawFile::read(&path);
    // Header claims the second tensor starts at 0 as well.
    let mut header = Map::new();
    let mut offset = 0;
    for (i, t) in raw.tensors.iter().enumerate() {
        let start = if i == 1 { 0 } else { offset };
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [start, start + t.data.len()]}),
        );
        offset += t.data.len();
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&text);
    for t in &raw.tensors {
        bytes.extend_from_slice(&t.data);
    }
    fs::write(&path, bytes).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

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

// ---------------------------------------------------------------------------------------
// tokenizer.json and generation_config.json
// ---------------------------------------------------------------------------------------

#[test]
fn corrupt_tokenizer() {
    let tmp = copy_fixture(SINGLE);
    let dir = ModelDir::new(tmp.path());
    let path = dir.tokenizer_path();
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, &text[..text.len() / 2]).unwrap();
    let e = Tokenizer::from_file(&path).unwrap_err();
    assert!(
        matches!(&e, LoadError::Tokenizer { path: p, .. } if *p == path),
        "{e:?}"
    );
    assert!(e.to_string().contains("tokenizer.json"), "{e}");

    // Valid JSON that is not a tokenizer.
    fs::write(&path, "{\"model\": 3}").unwrap();
    let e = Tokenizer::from_file(&path).unwrap_err();
    assert!(
        matches!(&e, LoadError::Tokenizer { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn missing_tokenizer() {
    let tmp = copy_fixture(SINGLE);
    let dir = ModelDir::new(tmp.path());
    let path = dir.tokenizer_path();
    fs::remove_file(&path).unwrap();
    let e = Tokenizer::from_file(&path).unwrap_err();
    assert!(
        matches!(&e, LoadError::Io { path: p, source } if *p == path && source.kind() == ErrorKind::NotFound),
        "{e:?}"
    );
}

#[test]
fn bad_generation_config_field() {
    let cases = [
        ("temperature", json!("hot")),
        ("top_k", json!(-1)),
        ("top_p", json!([0.9])),
        ("do_sample", json!("yes")),
        ("eos_token_id", json!([11, "x"])),
        ("eos_token_id", json!(-1)),
        ("bos_token_id", json!(1.5)),
        ("max_new_tokens", json!(2.5)),
        ("repetition_penalty", json!(true)),
    ];
    for (field, bad) in cases {
        let tmp = copy_fixture(SINGLE);
        let path = edit_json(tmp.path(), "generation_config.json", |v| {
            v[field] = bad.clone();
        });
        let e = ModelDir::new(tmp.path()).generation_defaults().unwrap_err();
        assert!(
            matches!(&e, LoadError::InvalidField { path: p, field: f, .. } if *p == path && *f == field),
            "{field} = {bad}: {e:?}"
        );
        assert!(e.to_string().contains("generation_config.json"), "{e}");
    }
}

#[test]
fn generation_config_is_not_json() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("generation_config.json");
    fs::write(&path, "{\"eos_token_id\": }").unwrap();
    let e = GenerationDefaults::from_dir(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, LoadError::Json { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn generation_config_values_and_absence() {
    let tmp = copy_fixture(SINGLE);
    edit_json(tmp.path(), "generation_config.json", |v| {
        v["eos_token_id"] = json!([0, 11]);
        v["temperature"] = json!(0.7);
        v["top_k"] = json!(50);
        v["top_p"] = json!(null);
        v["do_sample"] = json!(true);
    });
    let g = GenerationDefaults::from_dir(tmp.path()).unwrap();
    assert_eq!(g.eos_token_ids, vec![0, 11]);
    assert_eq!(g.bos_token_id, Some(0));
    assert_eq!(g.temperature, Some(0.7));
    assert_eq!(g.top_k, Some(50));
    assert_eq!(g.top_p, None);
    assert_eq!(g.do_sample, Some(true));

    fs::remove_file(tmp.path().join("generation_config.json")).unwrap();
    assert_eq!(
        GenerationDefaults::from_dir(tmp.path()).unwrap(),
        GenerationDefaults::default()
    );
}

// ---------------------------------------------------------------------------------------
// Layer ranges
// ---------------------------------------------------------------------------------------

fn layers(range: std::ops::Range<usize>) -> LoadOptions {
    LoadOptions {
        layers: Some(range),
        ..LoadOptions::default()
    }
}

#[test]
fn layer_range_outside_the_model() {
    let dir = fixture(SHARDED).dir;
    for (range, (start, end)) in [
        (5..9, (5, 9)),
        (1..3, (1, 3)),
        (1..1, (1, 1)),
        (2..2, (2, 2)),
    ] {
        let e = match load_with(&dir, &layers(range.clone())) {
            Ok(_) => panic!("{range:?} loaded"),
            Err(e) => e,
        };
        assert!(
            matches!(&e, LoadError::LayerRange { start: s, end: en, num_layers: 2 } if *s == start && *en == end),
            "{range:?}: {e:?}"
        );
    }
}

#[test]
fn layer_shards_load_and_chain_to_the_full_model() {
    let dir = fixture(SHARDED).dir;
    let backend = Arc::new(CpuBackend::new());
    let opts = |range| LoadOptions {
        layers: range,
        kv_blocks: 8,
        block_size: 4,
        progress: None,
    };
    let md = ModelDir::new(&dir);
    let mut full = Falcon::load(&md, Arc::clone(&backend), &opts(None)).unwrap();
    let mut first = Falcon::load(&md, Arc::clone(&backend), &opts(Some(0..1))).unwrap();
    let mut second = Falcon::load(&md, Arc::clone(&backend), &opts(Some(1..2))).unwrap();
    assert_eq!(full.layer_range(), 0..2);
    assert_eq!(first.layer_range(), 0..1);
    assert_eq!(second.layer_range(), 1..2);
    assert_eq!(first.kv_layout().num_layers, 1);
    assert_eq!(second.kv_layout().num_layers, 1);
    assert_eq!(first.config(), full.config());

    let tokens = [1u32, 5, 9, 2, 7];
    let chunk = SeqChunk {
        tokens: &tokens,
        start_pos: 0,
        block_table: &[0, 1],
        prompt_len: tokens.len(),
        all_logits: true,
    };
    let want = full.forward(&[chunk]).unwrap();

    let step = first.prepare(&[chunk]).unwrap();
    let h = first.embed(&step).unwrap();
    let h = first.run_layers(h, &step).unwrap();
    assert!(matches!(
        first.logits(&h, &step),
        Err(Error::Forward(ForwardError::NotInShard { .. }))
    ));
    let step2 = second.prepare(&[chunk]).unwrap();
    assert!(matches!(
        second.embed(&step2),
        Err(Error::Forward(ForwardError::NotInShard { .. }))
    ));
    let h = second.run_layers(h, &step2).unwrap();
    let got = second.logits(&h, &step2).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].num_rows(), tokens.len());
    for (g, w) in got[0].rows().zip(want[0].rows()) {
        let diff = g
            .iter()
            .zip(w)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff < 1e-5,
            "shard chain differs from the full model by {diff}"
        );
    }
}

#[test]
fn single_file_layer_shards_load() {
    let dir = fixture(SINGLE).dir;
    for range in [0..1, 1..2, 0..2] {
        let m = load_with(&dir, &layers(range.clone())).unwrap();
        assert_eq!(m.layer_range(), range);
    }
}

// ---------------------------------------------------------------------------------------
// Formerly known library bugs (fixed; kept as regression tests)
// ---------------------------------------------------------------------------------------

#[test]
fn empty_weight_map_names_a_file() {
    let tmp = copy_fixture(SHARDED);
    edit_json(tmp.path(), "model.safetensors.index.json", |v| {
        v["weight_map"] = json!({});
    });
    let e = load_err(tmp.path());
    let path = match &e {
        LoadError::MissingTensor { path, .. } => path.clone(),
        LoadError::NoWeights { dir } => dir.clone(),
        LoadError::MissingField { path, .. } | LoadError::InvalidField { path, .. } => path.clone(),
        other => panic!("unexpected {other:?}"),
    };
    assert!(!path.as_os_str().is_empty(), "{e:?}");
}

#[test]
fn load_progress_reports_every_byte_once_in_order() {
    use std::sync::Mutex;

    use falconer_engine::{LoadProgress, ProgressFn};
    for (name, layers) in [
        (SHARDED, None),
        (SHARDED, Some(1..2)),
        ("falcon7b_mqa", None),
    ] {
        let seen = Arc::new(Mutex::new(Vec::<LoadProgress>::new()));
        let sink = Arc::clone(&seen);
        let opts = LoadOptions {
            layers: layers.clone(),
            progress: Some(ProgressFn::new(move |p| sink.lock().unwrap().push(p))),
            ..LoadOptions::default()
        };
        Falcon::load(&fixture(name), Arc::new(CpuBackend::new()), &opts).unwrap();
        let seen = seen.lock().unwrap();
        let last = *seen.last().expect("no progress reported");
        assert!(last.bytes_total > 0);
        assert_eq!(
            last.bytes_done, last.bytes_total,
            "{name} {layers:?}: load did not reach 100%"
        );
        assert!(
            seen.windows(2).all(|w| w[0].bytes_done < w[1].bytes_done),
            "{name}: not increasing"
        );
        assert!(seen.iter().all(|p| p.bytes_total == last.bytes_total));
    }
}
