//! Reading an HF model directory: `config.json`, memory-mapped safetensors (single file
//! or sharded with `model.safetensors.index.json`), `tokenizer.json` and
//! `generation_config.json`.

mod generation;
mod safetensors;

use std::path::{Path, PathBuf};

pub use self::generation::GenerationDefaults;
pub use self::safetensors::{Dtype, HostTensor, WeightFiles};

use crate::config::FalconConfig;
use crate::error::LoadError;

/// The files of one model directory, resolved and opened lazily.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
}

impl ModelDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ModelDir { dir: dir.into() }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    pub fn config(&self) -> Result<FalconConfig, LoadError> {
        FalconConfig::from_file(&self.config_path())
    }

    /// Memory-maps every weight file (and validates headers and index).
    pub fn weights(&self) -> Result<WeightFiles, LoadError> {
        WeightFiles::open(&self.dir)
    }

    /// `generation_config.json` defaults; absent file means no defaults.
    pub fn generation_defaults(&self) -> Result<GenerationDefaults, LoadError> {
        GenerationDefaults::from_dir(&self.dir)
    }

    /// `tokenizer_config.json`'s `chat_template`, if any (used to pick a chat format).
    pub fn chat_template(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join("tokenizer_config.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v.get("chat_template")?.as_str().map(str::to_string)
    }

    /// The directory's last component, e.g. `falcon-7b-instruct`.
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.to_path_buf(),
        source,
    })
}
