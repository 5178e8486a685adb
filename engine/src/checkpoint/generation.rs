//! `generation_config.json`: the checkpoint's own sampling defaults and stop tokens.

use std::path::Path;

use serde_json::Value;

use super::read_json;
use crate::error::LoadError;

/// Defaults a checkpoint ships for generation; every field optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationDefaults {
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let v = read_json(&path)?;
        let invalid = |field: &'static str, v: &Value| LoadError::InvalidField {
            path: path.clone(),
            field,
            value: v.to_string(),
        };
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        let as_u32 = |field: &'static str, x: &Value| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| invalid(field, x))
        };
        let eos_token_ids = match get("eos_token_id") {
            None => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| as_u32("eos_token_id", x))
                .collect::<Result<_, _>>()?,
            Some(x) => vec![as_u32("eos_token_id", x)?],
        };
        let float = |field: &'static str| -> Result<Option<f32>, LoadError> {
            get(field)
                .map(|x| {
                    x.as_f64()
                        .map(|f| f as f32)
                        .ok_or_else(|| invalid(field, x))
                })
                .transpose()
        };
        let int = |field: &'static str| -> Result<Option<usize>, LoadError> {
            get(field)
                .map(|x| {
                    x.as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| invalid(field, x))
                })
                .transpose()
        };
        Ok(GenerationDefaults {
            eos_token_ids,
            bos_token_id: get("bos_token_id")
                .map(|x| as_u32("bos_token_id", x))
                .transpose()?,
            do_sample: get("do_sample")
                .map(|x| x.as_bool().ok_or_else(|| invalid("do_sample", x)))
                .transpose()?,
            temperature: float("temperature")?,
            top_k: int("top_k")?,
            top_p: float("top_p")?,
            repetition_penalty: float("repetition_penalty")?,
            max_new_tokens: int("max_new_tokens")?,
        })
    }
}
