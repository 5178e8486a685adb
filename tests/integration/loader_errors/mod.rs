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
pub(crate) fn copy_fixture(name: &str) -> TempDir {
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
pub(crate) struct RawTensor {
    pub(crate) name: String,
    pub(crate) dtype: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<u8>,
}

/// A safetensors file by hand: `__metadata__` plus tensors in data order.
#[derive(Debug, Clone)]
pub(crate) struct RawFile {
    metadata: Option<Value>,
    pub(crate) tensors: Vec<RawTensor>,
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
pub(crate) fn edit_safetensors(dir: &Path, file: &str, f: impl FnOnce(&mut RawFile)) -> PathBuf {
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

mod config_json;
mod files;
mod index;
mod layers;
mod quantized;
mod tensors;
mod tokenizer_files;
