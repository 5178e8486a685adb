//! RoPE settings from `config.json`, in both spellings.
//!
//! Checkpoints on the Hub write `rope_theta` plus `rope_scaling: {"type"|"rope_type":
//! ..., "factor": ...}`; transformers 5's `save_pretrained` writes one
//! `rope_parameters: {"rope_type": ..., "rope_theta": ..., ...}`. Both become a
//! [`RopeConfig`]. The math lives in [`crate::posenc::rope`].

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::LoadError;

/// Base frequency and scaling kind of the rotary embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// The `rope_type`s of HF `modeling_rope_utils.py` that Falcon can use.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// NTK-aware base growth once the sequence passes `max_position_embeddings`.
    Dynamic {
        factor: f64,
        max_position_embeddings: usize,
    },
    /// YaRN: per-frequency blend of interpolation and extrapolation, plus a cos/sin scale.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        attention_factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
    },
}

pub(super) fn parse(
    map: &Map<String, Value>,
    path: &Path,
    max_position_embeddings: usize,
) -> Result<RopeConfig, LoadError> {
    let params = match (map.get("rope_parameters"), map.get("rope_scaling")) {
        (Some(Value::Object(p)), _) => Some(p),
        (_, Some(Value::Object(p))) => Some(p),
        (Some(Value::Null) | None, Some(Value::Null) | None) => None,
        (Some(v), _) | (None, Some(v)) => {
            return Err(LoadError::InvalidField {
                path: path.to_path_buf(),
                field: "rope_scaling",
                value: v.to_string(),
            })
        }
    };
    let num = |m: &Map<String, Value>, key: &'static str| -> Result<Option<f64>, LoadError> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| LoadError::InvalidField {
                path: path.to_path_buf(),
                field: key,
                value: v.to_string(),
            }),
        }
    };
    let theta = match params.map(|p| num(p, "rope_theta")).transpose()?.flatten() {
        Some(t) => t,
        None => num(map, "rope_theta")?.unwrap_or(10_000.0),
    };
    if !(theta.is_finite() && theta > 1.0) {
        return Err(LoadError::InvalidField {
            path: path.to_path_buf(),
            field: "rope_theta",
            value: theta.to_string(),
        });
    }
    let Some(p) = params else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::None,
        });
    };
    // `rope_type` wins; a null one falls back to the older `type` key.
    let present = |k: &str| p.get(k).filter(|v| !v.is_null());
    let kind = match present("rope_type")
        .map(|v| ("rope_type", v))
        .or_else(|| present("type").map(|v| ("type", v)))
    {
        None => "default",
        Some((field, v)) => v.as_str().ok_or_else(|| LoadError::InvalidField {
            path: path.to_path_buf(),
            field,
            value: v.to_string(),
        })?,
    };
    let factor = |required: bool| -> Result<f64, LoadError> {
        let f = num(p, "factor")?;
        match f {
            Some(f) if f.is_finite() && f >= 1.0 => Ok(f),
            None if !required => Ok(1.0),
            other => Err(LoadError::InvalidField {
                path: path.to_path_buf(),
                field: "factor",
                value: other.map_or_else(|| "missing".to_string(), |f| f.to_string()),
            }),
        }
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: factor(true)?,
        },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor(true)?,
            max_position_embeddings,
        },
        "yarn" => {
            let original = match num(p, "original_max_position_embeddings")? {
                None => max_position_embeddings,
                Some(v) if v.is_finite() && v >= 1.0 && v.fract() == 0.0 && v < 1e15 => v as usize,
                Some(v) => {
                    return Err(LoadError::InvalidField {
                        path: path.to_path_buf(),
                        field: "original_max_position_embeddings",
                        value: v.to_string(),
                    })
                }
            };
            let factor = match num(p, "factor")? {
                Some(f) => factor(true).map(|_| f)?,
                None => max_position_embeddings as f64 / original as f64,
            };
            let mscale = num(p, "mscale")?;
            let mscale_all_dim = num(p, "mscale_all_dim")?;
            let get_mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match (num(p, "attention_factor")?, mscale, mscale_all_dim) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(md)) if m != 0.0 && md != 0.0 => {
                    get_mscale(factor, m) / get_mscale(factor, md)
                }
                _ => get_mscale(factor, 1.0),
            };
            let truncate = match p.get("truncate") {
                None | Some(Value::Null) => true,
                Some(v) => v.as_bool().ok_or_else(|| LoadError::InvalidField {
                    path: path.to_path_buf(),
                    field: "truncate",
                    value: v.to_string(),
                })?,
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                attention_factor,
                beta_fast: num(p, "beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0),
                beta_slow: num(p, "beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                truncate,
            }
        }
        other => {
            return Err(LoadError::UnknownRopeType {
                path: path.to_path_buf(),
                rope_type: other.to_string(),
            })
        }
    };
    Ok(RopeConfig { theta, scaling })
}
