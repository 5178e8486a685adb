//! Memory-mapped safetensors files, single or sharded, with every malformed case turned
//! into a [`LoadError`] that names the file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Metadata, SafeTensors, TensorInfo};

use super::read_json;
use crate::error::LoadError;

/// Element types falconer reads from checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }
}

/// A borrowed view of one tensor's bytes in a mapped file.
#[derive(Debug, Clone, Copy)]
pub struct HostTensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl HostTensor<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts to f32 (the CPU backend's compute type, and what quantization reads),
    /// in parallel chunks: a large checkpoint's layer weight is billions of bytes.
    pub fn to_f32(&self) -> Vec<f32> {
        const CHUNK: usize = 1 << 16;
        let size = self.dtype.size();
        let mut out = vec![0.0f32; self.bytes.len() / size];
        let convert = |(dst, src): (&mut [f32], &[u8])| {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(size)) {
                *d = match self.dtype {
                    Dtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    Dtype::Bf16 => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                    Dtype::F16 => f16::from_le_bytes([c[0], c[1]]).to_f32(),
                };
            }
        };
        if out.len() <= CHUNK {
            convert((&mut out, self.bytes));
        } else {
            out.par_chunks_mut(CHUNK)
                .zip(self.bytes.par_chunks(CHUNK * size))
                .for_each(convert);
        }
        out
    }
}

#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8-byte length prefix + JSON header).
    data_start: usize,
    metadata: Metadata,
}

/// Every weight file of a checkpoint, mapped, with a tensor-name index.
#[derive(Debug)]
pub struct WeightFiles {
    files: Vec<MappedFile>,
    /// tensor name -> index into `files`
    index: BTreeMap<String, usize>,
}

impl WeightFiles {
    /// Opens `model.safetensors` or the shards listed by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            Self::open_sharded(dir, &index_path)
        } else if single.exists() {
            let file = map_file(&single)?;
            let index = file
                .metadata
                .tensors()
                .into_keys()
                .map(|name| (name, 0))
                .collect();
            Ok(WeightFiles {
                files: vec![file],
                index,
            })
        } else {
            Err(LoadError::NoWeights {
                dir: dir.to_path_buf(),
            })
        }
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Self, LoadError> {
        let json = read_json(index_path)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LoadError::MissingField {
                path: index_path.to_path_buf(),
                field: "weight_map",
            })?;
        if map.is_empty() {
            return Err(LoadError::InvalidField {
                path: index_path.to_path_buf(),
                field: "weight_map",
                value: "{} (no tensors)".to_string(),
            });
        }
        let mut files = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut index = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| LoadError::InvalidField {
                path: index_path.to_path_buf(),
                field: "weight_map",
                value: file.to_string(),
            })?;
            // A shard name must stay inside the model directory.
            let bad_name = file.contains('/') || file.contains('\\') || file == "..";
            let path = dir.join(file);
            if bad_name || !path.is_file() {
                return Err(LoadError::IndexMissingFile {
                    index: index_path.to_path_buf(),
                    tensor: tensor.clone(),
                    file: file.to_string(),
                });
            }
            let slot = match by_name.get(file) {
                Some(&i) => i,
                None => {
                    files.push(map_file(&path)?);
                    by_name.insert(file.to_string(), files.len() - 1);
                    files.len() - 1
                }
            };
            if files[slot].metadata.info(tensor).is_none() {
                return Err(LoadError::MissingTensor {
                    path: files[slot].path.clone(),
                    tensor: tensor.clone(),
                });
            }
            index.insert(tensor.clone(), slot);
        }
        // Tensors stored in shards but absent from the index would be silently ignored by
        // HF; falconer reports them as unexpected.
        for f in &files {
            for name in f.metadata.tensors().into_keys() {
                if !index.contains_key(&name) {
                    return Err(LoadError::UnexpectedTensor {
                        path: f.path.clone(),
                        tensor: name,
                    });
                }
            }
        }
        Ok(WeightFiles { files, index })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file holding `name` (for error messages), or the first file.
    pub fn path_of(&self, name: &str) -> PathBuf {
        let i = self.index.get(name).copied().unwrap_or(0);
        self.files
            .get(i)
            .map(|f| f.path.clone())
            .unwrap_or_default()
    }

    /// Bytes of a tensor's data, whatever its dtype and shape (`None` if absent).
    pub fn byte_len(&self, name: &str) -> Option<usize> {
        let (start, end) = self.info(name).ok()?.1.data_offsets;
        Some(end - start)
    }

    /// The bytes of an integer tensor (`I8` or `U8`: a quantized checkpoint's weights),
    /// checked against its dtype and an expected shape.
    pub fn get_raw(
        &self,
        name: &str,
        dtype: safetensors::Dtype,
        expected: &[usize],
    ) -> Result<&[u8], LoadError> {
        let (file, info) = self.info(name)?;
        if info.dtype != dtype {
            return Err(LoadError::TensorDtype {
                path: file.path.clone(),
                tensor: name.to_string(),
                dtype: format!("{:?} (expected {dtype:?})", info.dtype),
            });
        }
        Self::data(file, info, name, expected)
    }

    /// A tensor's bytes once its shape is the expected one.
    fn data<'f>(
        file: &'f MappedFile,
        info: &TensorInfo,
        name: &str,
        expected: &[usize],
    ) -> Result<&'f [u8], LoadError> {
        if info.shape != expected {
            return Err(LoadError::TensorShape {
                path: file.path.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        // read_metadata validated that offsets lie inside the data section.
        let (start, end) = info.data_offsets;
        Ok(&file.mmap[file.data_start + start..file.data_start + end])
    }

    fn info(&self, name: &str) -> Result<(&MappedFile, &TensorInfo), LoadError> {
        let Some(&i) = self.index.get(name) else {
            return Err(LoadError::MissingTensor {
                path: self.path_of(name),
                tensor: name.to_string(),
            });
        };
        let file = &self.files[i];
        let info = file
            .metadata
            .info(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: file.path.clone(),
                tensor: name.to_string(),
            })?;
        Ok((file, info))
    }

    /// A tensor by name, checked against an expected shape.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<HostTensor<'_>, LoadError> {
        let (file, info) = self.info(name)?;
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => Dtype::F32,
            safetensors::Dtype::BF16 => Dtype::Bf16,
            safetensors::Dtype::F16 => Dtype::F16,
            other => {
                return Err(LoadError::TensorDtype {
                    path: file.path.clone(),
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let bytes = Self::data(file, info, name, expected)?;
        Ok(HostTensor {
            dtype,
            shape: &info.shape,
            bytes,
        })
    }
}

fn map_file(path: &Path) -> Result<MappedFile, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the
    // checkpoint not being modified while it is loaded.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&mmap).map_err(|e| LoadError::Safetensors {
            path: path.to_path_buf(),
            reason: describe(&e),
        })?;
    Ok(MappedFile {
        path: path.to_path_buf(),
        mmap,
        data_start: 8 + header_len,
        metadata,
    })
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => {
            "data section does not match the header (truncated or padded file)".into()
        }
        E::HeaderTooSmall | E::InvalidHeaderLength => "file too short for its header".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every dtype converts element by element, in the parallel chunks and the tail
    /// after them as in a small tensor.
    #[test]
    fn to_f32_converts_every_element_of_every_dtype() {
        let n = (1 << 16) * 2 + 37;
        let values: Vec<f32> = (0..n).map(|i| (i as f32 - 70_000.0) * 0.013).collect();
        for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            let (bytes, want): (Vec<u8>, Vec<f32>) = match dtype {
                Dtype::F32 => (
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    values.clone(),
                ),
                Dtype::Bf16 => (
                    values
                        .iter()
                        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                        .collect(),
                    values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                ),
                Dtype::F16 => (
                    values
                        .iter()
                        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                        .collect(),
                    values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
                ),
            };
            for len in [n, 100] {
                let shape = [len];
                let t = HostTensor {
                    dtype,
                    shape: &shape,
                    bytes: &bytes[..len * dtype.size()],
                };
                assert_eq!(t.to_f32(), want[..len], "{dtype:?}, {len} values");
            }
        }
    }
}
