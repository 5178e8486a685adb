//! Writing a quantized checkpoint: a model directory whose decoder-layer weights are
//! already int8 or int4, so that a large model is read (and not quantized) at each start.
//!
//! The layout is falconer's own, readable only by falconer: `config.json` gains the key
//! `falconer_weights` (the [`WeightFormat`]); each linear weight's integers stay under
//! its name (`I8 [rows, cols]`, or `U8 [rows, ceil(cols / 2)]` for int4) and its scales
//! go beside it as `<linear>.weight_scale` (`F32 [rows]` or `[rows, groups]`). Every other
//! tensor is copied as stored, file by file (shards keep their names and the index is
//! rewritten), and every other file of the directory is copied. One source file is held
//! in memory at a time.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype as St;
use thiserror::Error;

use super::{scale_name, QuantData, QuantError, QuantMatrix, WeightFormat};
use crate::checkpoint::{Dtype, ModelDir};
use crate::config::STORED_WEIGHTS_KEY;
use crate::error::LoadError;
use crate::model::{
    check_no_unexpected, expected_tensors, linear_shapes, LoadProgress, ProgressFn,
};

const INDEX: &str = "model.safetensors.index.json";

/// Why a quantized checkpoint could not be written.
#[derive(Debug, Error)]
pub enum SaveError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Format(#[from] QuantError),
    #[error("`checkpoint` is not an integer format: choose int8 or int4")]
    NotQuantized,
    #[error("{path}: the checkpoint already stores {stored} weights")]
    AlreadyQuantized { path: PathBuf, stored: WeightFormat },
    #[error("{path}: the destination is the source directory")]
    SameDirectory { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write safetensors: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// What [`save_quantized`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedCheckpoint {
    pub files: usize,
    /// Tensor bytes read from the source and written to the destination.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SaveError + '_ {
    move |source| SaveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `src` to `dst` (created if absent) with its layers' linear weights quantized
/// to `format`, calling `progress` (if any) after each tensor with the source bytes read.
pub fn save_quantized(
    src: &ModelDir,
    dst: &Path,
    format: WeightFormat,
    progress: Option<&ProgressFn>,
) -> Result<SavedCheckpoint, SaveError> {
    let quant = format.validate()?.quant().ok_or(SaveError::NotQuantized)?;
    let cfg = src.config()?;
    if cfg.stored_weights != WeightFormat::Checkpoint {
        return Err(SaveError::AlreadyQuantized {
            path: src.config_path(),
            stored: cfg.stored_weights,
        });
    }
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    let same = |a: &Path, b: &Path| a.canonicalize().ok() == b.canonicalize().ok();
    if same(&src.dir, dst) {
        return Err(SaveError::SameDirectory {
            path: dst.to_path_buf(),
        });
    }
    let files = src.weights()?;
    check_no_unexpected(&cfg, &files)?;

    // Every other file as it is; config.json with the format.
    for entry in std::fs::read_dir(&src.dir).map_err(io(&src.dir))? {
        let entry = entry.map_err(io(&src.dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let weights = name.ends_with(".safetensors") || name == INDEX || name == "config.json";
        if entry.path().is_file() && !weights {
            std::fs::copy(entry.path(), dst.join(&name)).map_err(io(&entry.path()))?;
        }
    }
    let mut config = crate::checkpoint::read_json(&src.config_path())?;
    if let Some(map) = config.as_object_mut() {
        map.insert(STORED_WEIGHTS_KEY.into(), format.to_string().into());
    }
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    std::fs::write(dst.join("config.json"), text).map_err(io(dst))?;

    let shapes: HashMap<String, Vec<usize>> = expected_tensors(&cfg).into_iter().collect();
    let linear: HashMap<String, (usize, usize)> = (0..cfg.num_layers)
        .flat_map(|i| {
            linear_shapes(&cfg).map(|(n, r, c)| (format!("transformer.h.{i}.{n}.weight"), (r, c)))
        })
        .collect();
    let total: u64 = shapes
        .keys()
        .filter_map(|n| files.byte_len(n))
        .map(|n| n as u64)
        .sum();
    let report = |done: u64| {
        if let Some(p) = progress {
            p.call(LoadProgress {
                bytes_done: done.min(total),
                bytes_total: total,
            });
        }
    };
    let mut by_file: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for name in files.names().filter(|n| shapes.contains_key(*n)) {
        let file = files.path_of(name);
        let file = file.file_name().map(|f| f.to_string_lossy().into_owned());
        by_file
            .entry(file.unwrap_or_default())
            .or_default()
            .push(name);
    }

    let mut saved = SavedCheckpoint {
        files: by_file.len(),
        bytes_in: 0,
        bytes_out: 0,
    };
    let mut weight_map = serde_json::Map::new();
    for (file, names) in &by_file {
        // (name, dtype, shape, bytes) of every tensor of this file.
        let mut out: Vec<(String, St, Vec<usize>, Vec<u8>)> = Vec::new();
        for &name in names {
            let shape = &shapes[name];
            let t = files.get(name, shape)?;
            saved.bytes_in += t.bytes.len() as u64;
            report(saved.bytes_in);
            let Some(&(rows, cols)) = linear.get(name) else {
                let dtype = match t.dtype {
                    Dtype::F32 => St::F32,
                    Dtype::Bf16 => St::BF16,
                    Dtype::F16 => St::F16,
                };
                out.push((name.to_string(), dtype, shape.clone(), t.bytes.to_vec()));
                continue;
            };
            let m = QuantMatrix::quantize(&t.to_f32(), rows, cols, quant).map_err(|source| {
                LoadError::Quantize {
                    path: files.path_of(name),
                    tensor: name.to_string(),
                    source,
                }
            })?;
            let stored = quant.stored_layout(rows, cols);
            let (values, scales) = match m.data() {
                QuantData::Int8 { q, scales } => (q.iter().map(|&v| v as u8).collect(), scales),
                QuantData::Int4 { packed, scales, .. } => (packed.clone(), scales),
            };
            let scales = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            out.push((scale_name(name), St::F32, stored.scale_shape, scales));
            out.push((name.to_string(), stored.dtype, stored.shape, values));
        }
        let path = dst.join(file);
        let write_err = |e: safetensors::SafeTensorError| SaveError::Write {
            path: path.clone(),
            reason: e.to_string(),
        };
        let views = out
            .iter()
            .map(|(n, d, s, b)| Ok((n.as_str(), TensorView::new(*d, s.clone(), b)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(write_err)?;
        safetensors::tensor::serialize_to_file(views, None, &path).map_err(write_err)?;
        for (n, _, _, b) in &out {
            saved.bytes_out += b.len() as u64;
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    if src.dir.join(INDEX).is_file() {
        let index = serde_json::json!({
            "metadata": { "total_size": saved.bytes_out },
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index).unwrap_or_default();
        std::fs::write(dst.join(INDEX), text).map_err(io(dst))?;
    }
    Ok(saved)
}
