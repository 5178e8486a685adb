//! `config.json` of every Falcon checkpoint layout, normalised into one [`FalconConfig`].
//!
//! Accepts the transformers `falcon` keys, the legacy RefinedWeb keys (`n_head`,
//! `n_layer`, `n_head_kv`, `n_embed`, model_type `RefinedWeb` / `RefinedWebModel`), and
//! both ways of writing RoPE settings (see [`rope`]). Everything that HF would reject or
//! crash on is a typed [`LoadError`] naming the file.

pub mod rope;

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::LoadError;
use crate::quant::WeightFormat;
pub use rope::{RopeConfig, RopeScaling};

/// Largest accepted vocabulary or hidden size.
const MAX_DIM: usize = 1 << 24;
/// Largest accepted layer or head count.
const MAX_COUNT: usize = 1 << 16;

/// How a decoder layer arranges its layer norms and residuals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerNorms {
    /// One `input_layernorm` feeding attention and MLP in parallel (Falcon-7B, and the
    /// new architecture with `num_ln_in_parallel_attn = 1`).
    Shared,
    /// `ln_attn` and `ln_mlp`, attention and MLP in parallel (Falcon-40B/180B).
    Separate,
    /// `input_layernorm` -> attention -> residual -> `post_attention_layernorm` -> MLP.
    Sequential,
}

/// The `config.json` key that names a quantized checkpoint's weight format.
pub const STORED_WEIGHTS_KEY: &str = "falconer_weights";

/// A Falcon model's shape and behaviour, normalised from any `config.json` spelling.
#[derive(Debug, Clone, PartialEq)]
pub struct FalconConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Key/value heads actually stored (1 for multi-query, whatever `num_kv_heads` says).
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_hidden_size: usize,
    pub layer_norm_epsilon: f32,
    pub layer_norms: LayerNorms,
    pub new_decoder_architecture: bool,
    pub bias: bool,
    pub alibi: bool,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub tie_word_embeddings: bool,
    /// How the checkpoint's decoder-layer weights are stored: as floats, or as the
    /// integers and scales `falconer_engine::quant::save_quantized` writes (its key
    /// `falconer_weights`).
    pub stored_weights: WeightFormat,
}

impl FalconConfig {
    /// Query heads per key/value head.
    pub fn queries_per_kv(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Rows of the fused `query_key_value` weight: per kv group, its query heads, one key
    /// head and one value head, `head_dim` rows each.
    pub fn qkv_rows(&self) -> usize {
        self.num_kv_heads * (self.queries_per_kv() + 2) * self.head_dim
    }

    /// Bytes of KV cache per token in a given element size (2 for bf16).
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_bytes
    }

    /// Reads and normalises `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses config text; `path` is only used to name the file in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, LoadError> {
        let value: Value = serde_json::from_str(text).map_err(|source| LoadError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let Value::Object(map) = value else {
            return Err(LoadError::InvalidField {
                path: path.to_path_buf(),
                field: "(root)",
                value: "not an object".into(),
            });
        };
        RawConfig {
            map: &map,
            path: path.to_path_buf(),
        }
        .normalise()
    }
}

/// Typed access to the JSON object with the file named in every error.
struct RawConfig<'a> {
    map: &'a Map<String, Value>,
    path: PathBuf,
}

impl RawConfig<'_> {
    fn get(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter()
            .filter_map(|k| self.map.get(*k))
            .find(|v| !v.is_null())
    }

    fn invalid(&self, field: &'static str, value: &Value) -> LoadError {
        LoadError::InvalidField {
            path: self.path.clone(),
            field,
            value: value.to_string(),
        }
    }

    fn usize_opt(&self, field: &'static str, keys: &[&str]) -> Result<Option<usize>, LoadError> {
        match self.get(keys) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.invalid(field, v)),
        }
    }

    /// `falconer_weights`: a [`WeightFormat`] string; absent means float weights.
    fn stored_weights(&self) -> Result<WeightFormat, LoadError> {
        match self.get(&[STORED_WEIGHTS_KEY]) {
            None => Ok(WeightFormat::Checkpoint),
            Some(v) => v
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| self.invalid(STORED_WEIGHTS_KEY, v)),
        }
    }

    fn usize_req(&self, field: &'static str, keys: &[&str]) -> Result<usize, LoadError> {
        let n = self
            .usize_opt(field, keys)?
            .ok_or_else(|| LoadError::MissingField {
                path: self.path.clone(),
                field,
            })?;
        if n == 0 {
            return Err(self.invalid(field, &Value::from(0)));
        }
        Ok(n)
    }

    fn bool_or(
        &self,
        field: &'static str,
        keys: &[&str],
        default: bool,
    ) -> Result<bool, LoadError> {
        match self.get(keys) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.invalid(field, v)),
        }
    }

    fn f64_opt(&self, field: &'static str, keys: &[&str]) -> Result<Option<f64>, LoadError> {
        match self.get(keys) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.invalid(field, v)),
        }
    }

    fn token_ids(&self, field: &'static str, keys: &[&str]) -> Result<Vec<u32>, LoadError> {
        let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.get(keys) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| one(v).ok_or_else(|| self.invalid(field, v)))
                .collect(),
            Some(v) => one(v)
                .map(|id| vec![id])
                .ok_or_else(|| self.invalid(field, v)),
        }
    }

    fn normalise(&self) -> Result<FalconConfig, LoadError> {
        let model_type = self
            .get(&["model_type"])
            .and_then(Value::as_str)
            .unwrap_or("falcon");
        if !matches!(model_type, "falcon" | "RefinedWeb" | "RefinedWebModel") {
            return Err(self.invalid("model_type", &Value::from(model_type)));
        }
        let vocab_size = self.usize_req("vocab_size", &["vocab_size"])?;
        let hidden_size = self.usize_req("hidden_size", &["hidden_size", "n_embed"])?;
        let num_layers = self.usize_req("num_hidden_layers", &["num_hidden_layers", "n_layer"])?;
        let num_heads =
            self.usize_req("num_attention_heads", &["num_attention_heads", "n_head"])?;
        let config_kv = self.usize_opt("num_kv_heads", &["num_kv_heads", "n_head_kv"])?;
        // Far above any real model, and low enough that every size derived from these
        // (4 * hidden, qkv rows, KV bytes per token, vocab * hidden) fits in a usize.
        for (field, v, max) in [
            ("vocab_size", vocab_size, MAX_DIM),
            ("hidden_size", hidden_size, MAX_DIM),
            ("num_hidden_layers", num_layers, MAX_COUNT),
            ("num_attention_heads", num_heads, MAX_COUNT),
            ("num_kv_heads", config_kv.unwrap_or(1), MAX_COUNT),
        ] {
            if v > max {
                return Err(self.invalid(field, &Value::from(v)));
            }
        }
        if config_kv == Some(0) {
            return Err(self.invalid("num_kv_heads", &Value::from(0)));
        }
        // The original RefinedWeb code chose the decoder by model type: "RefinedWeb" was
        // the 40B (new) decoder, "RefinedWebModel" the 7B one.
        let new_arch_default = model_type == "RefinedWeb";
        let new_arch = self.bool_or(
            "new_decoder_architecture",
            &["new_decoder_architecture"],
            new_arch_default,
        )?;
        let multi_query = self.bool_or("multi_query", &["multi_query"], true)?;
        let parallel_attn = self.bool_or("parallel_attn", &["parallel_attn"], true)?;
        let bias = self.bool_or("bias", &["bias"], false)?;
        let alibi = self.bool_or("alibi", &["alibi"], false)?;
        let tie = self.bool_or("tie_word_embeddings", &["tie_word_embeddings"], true)?;

        if hidden_size % num_heads != 0 {
            return Err(LoadError::HeadsDoNotDivideHidden {
                path: self.path.clone(),
                hidden_size,
                num_heads,
            });
        }
        let head_dim = hidden_size / num_heads;
        // Pitfall (HF FalconAttention): multi-query without the new architecture stores
        // exactly one kv head, whatever num_kv_heads says; plain multi-head stores one kv
        // head per query head.
        let num_kv_heads = if new_arch {
            config_kv.unwrap_or(num_heads)
        } else if multi_query {
            1
        } else {
            if let Some(kv) = config_kv.filter(|&kv| kv != num_heads) {
                return Err(LoadError::KvHeadsDoNotDivideHeads {
                    path: self.path.clone(),
                    num_heads,
                    num_kv_heads: kv,
                });
            }
            num_heads
        };
        if num_heads % num_kv_heads != 0 {
            return Err(LoadError::KvHeadsDoNotDivideHeads {
                path: self.path.clone(),
                num_heads,
                num_kv_heads,
            });
        }

        let num_ln = self.usize_opt("num_ln_in_parallel_attn", &["num_ln_in_parallel_attn"])?;
        let layer_norms = match (new_arch, parallel_attn, num_ln) {
            (true, false, _) => {
                return Err(LoadError::Unsupported {
                    path: self.path.clone(),
                    feature: "new_decoder_architecture with parallel_attn = false",
                })
            }
            (true, true, None | Some(2)) => LayerNorms::Separate,
            (true, true, Some(1)) | (false, true, None | Some(1)) => LayerNorms::Shared,
            (false, false, _) => LayerNorms::Sequential,
            (_, true, Some(n)) => {
                return Err(self.invalid("num_ln_in_parallel_attn", &Value::from(n)));
            }
        };

        let activation = self
            .get(&["activation"])
            .and_then(Value::as_str)
            .unwrap_or("gelu");
        if activation != "gelu" {
            return Err(LoadError::Unsupported {
                path: self.path.clone(),
                feature: "activation other than exact gelu",
            });
        }
        let ffn_hidden_size = self
            .usize_opt("ffn_hidden_size", &["ffn_hidden_size"])?
            .unwrap_or(4 * hidden_size);
        if ffn_hidden_size > 4 * MAX_DIM {
            return Err(self.invalid("ffn_hidden_size", &Value::from(ffn_hidden_size)));
        }
        let layer_norm_epsilon = self
            .f64_opt("layer_norm_epsilon", &["layer_norm_epsilon"])?
            .unwrap_or(1e-5) as f32;
        let max_position_embeddings = self
            .usize_opt("max_position_embeddings", &["max_position_embeddings"])?
            .unwrap_or(2048);
        let rope = rope::parse(self.map, &self.path, max_position_embeddings)?;
        if !alibi && head_dim % 2 != 0 {
            return Err(LoadError::Unsupported {
                path: self.path.clone(),
                feature: "rotary embeddings with an odd head_dim",
            });
        }
        let bos_token_id = self
            .token_ids("bos_token_id", &["bos_token_id"])?
            .first()
            .copied();
        let eos_token_ids = self.token_ids("eos_token_id", &["eos_token_id"])?;
        Ok(FalconConfig {
            vocab_size,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            ffn_hidden_size,
            layer_norm_epsilon,
            layer_norms,
            new_decoder_architecture: new_arch,
            bias,
            alibi,
            rope,
            max_position_embeddings,
            bos_token_id,
            eos_token_ids,
            tie_word_embeddings: tie,
            stored_weights: self.stored_weights()?,
        })
    }
}

#[cfg(test)]
mod tests;
