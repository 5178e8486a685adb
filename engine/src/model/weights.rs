//! Falcon's tensor names and shapes, and loading them (a layer range of them, for a
//! shard) from a checkpoint into backend memory.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;

use super::progress::{LoadProgress, ProgressFn};
use crate::backend::Backend;
use crate::checkpoint::WeightFiles;
use crate::config::{FalconConfig, LayerNorms};
use crate::error::LoadError;
use crate::quant::{scale_name, Quant, QuantData, QuantMatrix, WeightFormat};

/// A layer norm's scale and shift.
#[derive(Debug)]
pub struct Norm<B: Backend> {
    pub weight: B::Tensor,
    pub bias: B::Tensor,
}

/// A linear layer in checkpoint layout `[out, in]`.
#[derive(Debug)]
pub struct Linear<B: Backend> {
    pub weight: B::Tensor,
    pub bias: Option<B::Tensor>,
}

impl<B: Backend> Linear<B> {
    /// Weight and bias as backend calls take them.
    pub fn parts(&self) -> (&B::Tensor, Option<&B::Tensor>) {
        (&self.weight, self.bias.as_ref())
    }

    fn bytes(&self, b: &B) -> usize {
        b.tensor_bytes(&self.weight) + self.bias.as_ref().map_or(0, |t| b.tensor_bytes(t))
    }
}

impl<B: Backend> Norm<B> {
    fn bytes(&self, b: &B) -> usize {
        b.tensor_bytes(&self.weight) + b.tensor_bytes(&self.bias)
    }
}

impl<B: Backend> LayerWeights<B> {
    /// Bytes of backend memory the layer's tensors hold.
    pub fn bytes(&self, b: &B) -> usize {
        let norms = match &self.norms {
            LayerNormWeights::Shared { input } => input.bytes(b),
            LayerNormWeights::Separate { attn, mlp } => attn.bytes(b) + mlp.bytes(b),
            LayerNormWeights::Sequential {
                input,
                post_attention,
            } => input.bytes(b) + post_attention.bytes(b),
        };
        norms
            + [&self.qkv, &self.dense, &self.h_to_4h, &self.four_h_to_h]
                .iter()
                .map(|l| l.bytes(b))
                .sum::<usize>()
    }
}

/// The norms of one decoder layer, by layout.
#[derive(Debug)]
pub enum LayerNormWeights<B: Backend> {
    Shared {
        input: Norm<B>,
    },
    Separate {
        attn: Norm<B>,
        mlp: Norm<B>,
    },
    Sequential {
        input: Norm<B>,
        post_attention: Norm<B>,
    },
}

/// One decoder layer.
#[derive(Debug)]
pub struct LayerWeights<B: Backend> {
    pub norms: LayerNormWeights<B>,
    pub qkv: Linear<B>,
    pub dense: Linear<B>,
    pub h_to_4h: Linear<B>,
    pub four_h_to_h: Linear<B>,
}

/// Final norm and output projection (held by the last shard).
#[derive(Debug)]
pub struct HeadWeights<B: Backend> {
    pub ln_f: Norm<B>,
    pub lm_head: Arc<B::Tensor>,
}

impl<B: Backend> HeadWeights<B> {
    /// Bytes of the final norm, and of the output projection unless `embeddings` is
    /// the same tensor (a tied head, counted once).
    pub fn bytes(&self, b: &B, embeddings: Option<&Arc<B::Tensor>>) -> usize {
        let tied = embeddings.is_some_and(|e| Arc::ptr_eq(e, &self.lm_head));
        self.ln_f.bytes(b)
            + if tied {
                0
            } else {
                b.tensor_bytes(&self.lm_head)
            }
    }
}

/// Every tensor name a full model of this config may hold, with its shape.
pub fn expected_tensors(cfg: &FalconConfig) -> Vec<(String, Vec<usize>)> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = vec![
        ("transformer.word_embeddings.weight".to_string(), vec![v, h]),
        ("transformer.ln_f.weight".to_string(), vec![h]),
        ("transformer.ln_f.bias".to_string(), vec![h]),
        ("lm_head.weight".to_string(), vec![v, h]),
    ];
    for i in 0..cfg.num_layers {
        let p = format!("transformer.h.{i}");
        for norm in norm_names(cfg.layer_norms) {
            out.push((format!("{p}.{norm}.weight"), vec![h]));
            out.push((format!("{p}.{norm}.bias"), vec![h]));
        }
        for (name, rows, cols) in linear_shapes(cfg) {
            let weight = format!("{p}.{name}.weight");
            match cfg.stored_weights.quant() {
                None => out.push((weight, vec![rows, cols])),
                Some(q) => {
                    let stored = q.stored_layout(rows, cols);
                    out.push((scale_name(&weight), stored.scale_shape));
                    out.push((weight, stored.shape));
                }
            }
            if cfg.bias {
                out.push((format!("{p}.{name}.bias"), vec![rows]));
            }
        }
    }
    out
}

/// A decoder layer's four linear weights: name under `transformer.h.<i>`, rows, columns.
pub fn linear_shapes(cfg: &FalconConfig) -> [(&'static str, usize, usize); 4] {
    let (h, f) = (cfg.hidden_size, cfg.ffn_hidden_size);
    [
        ("self_attention.query_key_value", cfg.qkv_rows(), h),
        ("self_attention.dense", h, h),
        ("mlp.dense_h_to_4h", f, h),
        ("mlp.dense_4h_to_h", h, f),
    ]
}

fn norm_names(layout: LayerNorms) -> &'static [&'static str] {
    match layout {
        LayerNorms::Shared => &["input_layernorm"],
        LayerNorms::Separate => &["ln_attn", "ln_mlp"],
        LayerNorms::Sequential => &["input_layernorm", "post_attention_layernorm"],
    }
}

/// Rejects tensors that are not part of this layout (a wrong config, a wrong file).
pub fn check_no_unexpected(cfg: &FalconConfig, files: &WeightFiles) -> Result<(), LoadError> {
    let known: BTreeSet<String> = expected_tensors(cfg).into_iter().map(|(n, _)| n).collect();
    // HF ignores these buffers if a checkpoint carries them.
    let ignorable = |n: &str| n.ends_with(".rotary_emb.inv_freq") || n.ends_with("masked_bias");
    match files.names().find(|n| !known.contains(*n) && !ignorable(n)) {
        Some(n) => Err(LoadError::UnexpectedTensor {
            path: files.path_of(n),
            tensor: n.to_string(),
        }),
        None => Ok(()),
    }
}

/// Uploads tensors by name with shape checks, reporting progress.
pub struct Loader<'a, B: Backend> {
    pub backend: &'a B,
    pub files: &'a WeightFiles,
    pub cfg: &'a FalconConfig,
    pub progress: Option<&'a ProgressFn>,
    /// The format of the decoder layers' linear weights.
    pub weights: WeightFormat,
    pub done: Cell<u64>,
    pub total: u64,
}

impl<B: Backend> Loader<'_, B> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<B::Tensor, LoadError> {
        let t = self.files.get(name, shape)?;
        let up = self.backend.upload(&t)?;
        self.uploaded(t.bytes.len());
        Ok(up)
    }

    /// A decoder layer's linear weight `[rows, cols]`, in the load's weight format: as
    /// a quantized checkpoint stores it, or quantized from the checkpoint's floats.
    fn weight(&self, name: &str, rows: usize, cols: usize) -> Result<B::Tensor, LoadError> {
        if let Some(stored) = self.cfg.stored_weights.quant() {
            let m = self.stored(name, rows, cols, stored)?;
            self.uploaded(m.bytes());
            return Ok(self.backend.upload_quantized(m)?);
        }
        let Some(quant) = self.weights.quant() else {
            return self.tensor(name, &[rows, cols]);
        };
        let t = self.files.get(name, &[rows, cols])?;
        let q = QuantMatrix::quantize(&t.to_f32(), rows, cols, quant).map_err(|source| {
            LoadError::Quantize {
                path: self.files.path_of(name),
                tensor: name.to_string(),
                source,
            }
        })?;
        let up = self.backend.upload_quantized(q)?;
        self.uploaded(t.bytes.len());
        Ok(up)
    }

    /// A stored quantized weight: its integers under `name`, its scales beside them.
    fn stored(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        quant: Quant,
    ) -> Result<QuantMatrix, LoadError> {
        let stored = quant.stored_layout(rows, cols);
        let values = self.files.get_raw(name, stored.dtype, &stored.shape)?;
        let scales: Vec<f32> = self
            .files
            .get_raw(
                &scale_name(name),
                safetensors::Dtype::F32,
                &stored.scale_shape,
            )?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let data = match quant {
            Quant::Int8 => QuantData::Int8 {
                q: values.iter().map(|&b| b as i8).collect(),
                scales,
            },
            Quant::Int4 { group } => QuantData::Int4 {
                packed: values.to_vec(),
                scales,
                group,
            },
        };
        QuantMatrix::from_parts(rows, cols, data).map_err(|source| LoadError::Quantize {
            path: self.files.path_of(name),
            tensor: name.to_string(),
            source,
        })
    }

    fn uploaded(&self, bytes: usize) {
        self.done.set(self.done.get() + bytes as u64);
        self.report();
    }

    /// Calls the progress callback (done is clamped to the planned total).
    pub fn report(&self) {
        if let Some(p) = self.progress {
            p.call(LoadProgress {
                bytes_done: self.done.get().min(self.total),
                bytes_total: self.total,
            });
        }
    }

    /// Bytes this load will upload for `range`, as far as the files can tell (tensors
    /// that are missing or malformed fail later, in the load itself).
    pub fn planned_bytes(&self, range: &Range<usize>) -> u64 {
        let n = self.cfg.num_layers;
        let tied = self.cfg.tie_word_embeddings;
        expected_tensors(self.cfg)
            .into_iter()
            .filter(|(name, _)| match name.strip_prefix("transformer.h.") {
                Some(rest) => rest
                    .split('.')
                    .next()
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| range.contains(&i)),
                None => match name.as_str() {
                    "transformer.word_embeddings.weight" => {
                        range.start == 0 || (range.end == n && tied)
                    }
                    "lm_head.weight" => range.end == n && !tied,
                    _ => range.end == n,
                },
            })
            .filter_map(|(name, _)| self.files.byte_len(&name))
            .map(|n| n as u64)
            .sum()
    }

    fn norm(&self, prefix: &str) -> Result<Norm<B>, LoadError> {
        let h = self.cfg.hidden_size;
        Ok(Norm {
            weight: self.tensor(&format!("{prefix}.weight"), &[h])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[h])?,
        })
    }

    fn linear(&self, prefix: &str, rows: usize, cols: usize) -> Result<Linear<B>, LoadError> {
        Ok(Linear {
            weight: self.weight(&format!("{prefix}.weight"), rows, cols)?,
            bias: if self.cfg.bias {
                Some(self.tensor(&format!("{prefix}.bias"), &[rows])?)
            } else {
                None
            },
        })
    }

    pub fn embeddings(&self) -> Result<B::Tensor, LoadError> {
        self.tensor(
            "transformer.word_embeddings.weight",
            &[self.cfg.vocab_size, self.cfg.hidden_size],
        )
    }

    pub fn layers(&self, range: Range<usize>) -> Result<Vec<LayerWeights<B>>, LoadError> {
        let (h, f) = (self.cfg.hidden_size, self.cfg.ffn_hidden_size);
        range
            .map(|i| {
                let p = format!("transformer.h.{i}");
                let norms = match self.cfg.layer_norms {
                    LayerNorms::Shared => LayerNormWeights::Shared {
                        input: self.norm(&format!("{p}.input_layernorm"))?,
                    },
                    LayerNorms::Separate => LayerNormWeights::Separate {
                        attn: self.norm(&format!("{p}.ln_attn"))?,
                        mlp: self.norm(&format!("{p}.ln_mlp"))?,
                    },
                    LayerNorms::Sequential => LayerNormWeights::Sequential {
                        input: self.norm(&format!("{p}.input_layernorm"))?,
                        post_attention: self.norm(&format!("{p}.post_attention_layernorm"))?,
                    },
                };
                Ok(LayerWeights {
                    norms,
                    qkv: self.linear(
                        &format!("{p}.self_attention.query_key_value"),
                        self.cfg.qkv_rows(),
                        h,
                    )?,
                    dense: self.linear(&format!("{p}.self_attention.dense"), h, h)?,
                    h_to_4h: self.linear(&format!("{p}.mlp.dense_h_to_4h"), f, h)?,
                    four_h_to_h: self.linear(&format!("{p}.mlp.dense_4h_to_h"), h, f)?,
                })
            })
            .collect()
    }

    /// The output head; a tied head reuses `embeddings` when this shard holds them.
    pub fn head(&self, embeddings: Option<&Arc<B::Tensor>>) -> Result<HeadWeights<B>, LoadError> {
        let lm_head = match (self.cfg.tie_word_embeddings, embeddings) {
            (true, Some(e)) => Arc::clone(e),
            (true, None) => Arc::new(self.embeddings()?),
            (false, _) => Arc::new(self.tensor(
                "lm_head.weight",
                &[self.cfg.vocab_size, self.cfg.hidden_size],
            )?),
        };
        Ok(HeadWeights {
            ln_f: self.norm("transformer.ln_f")?,
            lm_head,
        })
    }
}
