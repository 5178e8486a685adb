//! The Falcon decoder over a paged KV cache, generic over a [`Backend`].
//!
//! One forward pass runs any mix of prefill, one-token decode and multi-token verify
//! chunks for many sequences at once. A [`Falcon`] may hold all layers or a contiguous
//! range of them (a pipeline shard): the first shard embeds, the last one produces
//! logits, and hidden states travel between shards as backend tensors.

mod outputs;
mod progress;
mod step;
mod weights;

use std::ops::Range;
use std::sync::Arc;

pub use outputs::{RowsOut, RowsWanted};
pub use progress::{LoadProgress, ProgressFn};
pub use step::SeqChunk;
pub(crate) use weights::check_no_unexpected;
pub use weights::{expected_tensors, linear_shapes};

use crate::backend::{AttnConfig, Backend, KvLayout, ParallelWeights, StepMeta};
use crate::checkpoint::ModelDir;
use crate::config::FalconConfig;
use crate::error::{BackendError, ForwardError, LoadError, Result};
use crate::posenc::{alibi, rope::Rope};
use crate::quant::WeightFormat;
use weights::{HeadWeights, LayerNormWeights, LayerWeights, Linear, Loader};

/// Steps of at most this many token rows run the qkv and MLP up projections of a
/// shared-norm layer as one backend call ([`Backend::linear_and_gelu`]).
const PAIR_MAX_ROWS: usize = 64;

/// How much KV memory to give a model and which layers to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Layers this instance holds; `None` means all.
    pub layers: Option<Range<usize>>,
    pub kv_blocks: usize,
    pub block_size: usize,
    /// Called as weights are uploaded (see [`ProgressFn::stderr_bar`]).
    pub progress: Option<ProgressFn>,
    /// How the decoder layers' linear weights are held ([`crate::quant`]).
    pub weights: WeightFormat,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            layers: None,
            kv_blocks: 256,
            block_size: 16,
            progress: None,
            weights: WeightFormat::Checkpoint,
        }
    }
}

/// Logits for the rows a chunk asked for, `[rows, vocab]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    pub vocab_size: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn num_rows(&self) -> usize {
        self.data.len() / self.vocab_size.max(1)
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab_size..(i + 1) * self.vocab_size]
    }

    pub fn last(&self) -> &[f32] {
        self.row(self.num_rows().saturating_sub(1))
    }

    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.data.chunks(self.vocab_size.max(1))
    }
}

/// A prepared forward step: host metadata plus its backend-resident copy.
#[derive(Debug)]
pub struct Step<B: Backend> {
    pub meta: StepMeta,
    pub device: B::Step,
    /// Logit rows per chunk, to split the output.
    rows_per_chunk: Vec<usize>,
}

/// A Falcon model, or a contiguous layer range of one.
#[derive(Debug)]
pub struct Falcon<B: Backend> {
    cfg: FalconConfig,
    /// How the layers' linear weights are held.
    weights: WeightFormat,
    /// Backend memory the loaded weights hold.
    weight_bytes: usize,
    backend: Arc<B>,
    layers_range: Range<usize>,
    embeddings: Option<Arc<B::Tensor>>,
    layers: Vec<LayerWeights<B>>,
    head: Option<HeadWeights<B>>,
    rope: Option<Rope>,
    attn: AttnConfig,
    kv: B::KvCache,
    kv_layout: KvLayout,
    /// The backend's recordings of this model's steps ([`Backend::run_step`]).
    graphs: B::StepGraphs,
}

impl<B: Backend> Falcon<B> {
    /// Loads `dir` (or a layer range of it) onto `backend`.
    pub fn load(dir: &ModelDir, backend: Arc<B>, opts: &LoadOptions) -> Result<Self, LoadError> {
        let cfg = dir.config()?;
        let weights = opts
            .weights
            .validate()
            .map_err(|source| LoadError::WeightFormat {
                format: opts.weights,
                source,
            })?;
        // A quantized checkpoint's weights are used as stored.
        let weights = match (cfg.stored_weights, weights) {
            (WeightFormat::Checkpoint, w) => w,
            (stored, WeightFormat::Checkpoint) => stored,
            (stored, asked) if stored == asked => stored,
            (stored, asked) => {
                return Err(LoadError::StoredWeights {
                    path: dir.config_path(),
                    stored,
                    asked,
                })
            }
        };
        if !backend.supports_weights(weights) {
            return Err(BackendError::WeightFormat {
                backend: backend.name(),
                format: weights,
            }
            .into());
        }
        let files = dir.weights()?;
        weights::check_no_unexpected(&cfg, &files)?;
        let range = opts.layers.clone().unwrap_or(0..cfg.num_layers);
        if range.start >= range.end || range.end > cfg.num_layers {
            return Err(LoadError::LayerRange {
                start: range.start,
                end: range.end,
                num_layers: cfg.num_layers,
            });
        }
        let mut loader = Loader {
            backend: backend.as_ref(),
            files: &files,
            cfg: &cfg,
            progress: opts.progress.as_ref(),
            weights,
            done: std::cell::Cell::new(0),
            total: 0,
        };
        loader.total = loader.planned_bytes(&range);
        let embeddings = if range.start == 0 {
            Some(Arc::new(loader.embeddings()?))
        } else {
            None
        };
        let layers = loader.layers(range.clone())?;
        let head = if range.end == cfg.num_layers {
            Some(loader.head(embeddings.as_ref())?)
        } else {
            None
        };
        let kv_layout = KvLayout {
            num_layers: range.len(),
            num_blocks: opts.kv_blocks,
            block_size: opts.block_size.max(1),
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        };
        let kv = backend.alloc_kv(&kv_layout)?;
        let attn = AttnConfig {
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            alibi_slopes: cfg.alibi.then(|| alibi::slopes(cfg.num_heads)),
        };
        let rope = (!cfg.alibi).then(|| Rope::new(&cfg.rope, cfg.head_dim));
        let b = backend.as_ref();
        let weight_bytes = embeddings.as_ref().map_or(0, |e| b.tensor_bytes(e))
            + layers.iter().map(|l| l.bytes(b)).sum::<usize>()
            + head.as_ref().map_or(0, |h| h.bytes(b, embeddings.as_ref()));
        Ok(Falcon {
            cfg,
            weights,
            weight_bytes,
            backend,
            layers_range: range,
            embeddings,
            layers,
            head,
            rope,
            attn,
            kv,
            kv_layout,
            graphs: B::StepGraphs::default(),
        })
    }

    /// The backend's recordings of this model's steps (the CUDA backend reports how
    /// its steps ran through them).
    pub fn step_graphs(&self) -> &B::StepGraphs {
        &self.graphs
    }

    pub fn config(&self) -> &FalconConfig {
        &self.cfg
    }

    /// How the decoder layers' linear weights are held: as asked in [`LoadOptions`], or
    /// as a quantized checkpoint stores them.
    pub fn weight_format(&self) -> WeightFormat {
        self.weights
    }

    /// Bytes of backend memory this model's (or shard's) weights hold: f32 on the CPU,
    /// bf16 on the GPU, integers and scales for quantized layer weights.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    pub fn layer_range(&self) -> Range<usize> {
        self.layers_range.clone()
    }

    pub fn kv_layout(&self) -> KvLayout {
        self.kv_layout
    }

    /// Validates the chunks and uploads the step's metadata.
    pub fn prepare(&self, chunks: &[SeqChunk<'_>]) -> Result<Step<B>> {
        let meta = step::build(
            chunks,
            &self.cfg,
            self.rope.as_ref(),
            self.kv_layout.block_size,
        )?;
        let device = self.backend.prepare_step(&meta)?;
        let rows_per_chunk = chunks
            .iter()
            .filter(|c| !c.tokens.is_empty())
            .map(|c| if c.all_logits { c.tokens.len() } else { 1 })
            .collect();
        Ok(Step {
            meta,
            device,
            rows_per_chunk,
        })
    }

    /// Token embeddings (first shard only).
    pub fn embed(&self, step: &Step<B>) -> Result<B::Tensor> {
        self.embed_rows(&step.device)
    }

    fn embed_rows(&self, device: &B::Step) -> Result<B::Tensor> {
        let table = self
            .embeddings
            .as_ref()
            .ok_or(ForwardError::NotInShard { part: "embeddings" })?;
        Ok(self.backend.embed(table, device)?)
    }

    /// Runs this instance's layers over `hidden` (`[rows, hidden]`), writing their KV.
    pub fn run_layers(&mut self, hidden: B::Tensor, step: &Step<B>) -> Result<B::Tensor> {
        let rows = step.meta.token_ids.len();
        self.run_layers_on(hidden, &step.device, rows)
    }

    fn run_layers_on(
        &mut self,
        hidden: B::Tensor,
        device: &B::Step,
        rows: usize,
    ) -> Result<B::Tensor> {
        let mut x = hidden;
        for i in 0..self.layers.len() {
            x = self.layer(i, x, device, rows)?;
        }
        Ok(x)
    }

    /// A whole step from the embeddings to the logit rows (this instance must hold
    /// every layer), left in backend memory; the backend may replay a recording of it
    /// ([`Backend::run_step`]).
    pub fn step_logits(&mut self, step: &Step<B>) -> Result<B::Tensor> {
        // Checked before any layer runs (and writes its KV), not after.
        if self.head.is_none() {
            return Err(ForwardError::NotInShard {
                part: "output head",
            }
            .into());
        }
        self.run_shard(step, None)
    }

    /// This instance's part of a step as one unit, which the backend may replay from a
    /// recording ([`Backend::run_step`]): from `hidden` (the previous shard's output;
    /// `None` embeds the step's tokens, first shard only) through its layers, to the
    /// logit rows on the last shard or the hidden state for the next one.
    pub fn run_shard(&mut self, step: &Step<B>, hidden: Option<B::Tensor>) -> Result<B::Tensor> {
        if hidden.is_none() && self.embeddings.is_none() {
            return Err(ForwardError::NotInShard { part: "embeddings" }.into());
        }
        let rows = step.meta.token_ids.len();
        let backend = Arc::clone(&self.backend);
        let mut graphs = std::mem::take(&mut self.graphs);
        let out = backend.run_step(&mut graphs, &step.device, hidden, &mut |device, input| {
            let h = match input {
                Some(h) => h,
                None => self.embed_rows(device)?,
            };
            let h = self.run_layers_on(h, device, rows)?;
            match self.head {
                Some(_) => self.head_logits(&h, device),
                None => Ok(h),
            }
        });
        self.graphs = graphs;
        out
    }

    /// `acc += l(x)`: the residual add fused into the product where the backend can.
    fn linear_add(&self, x: &B::Tensor, l: &Linear<B>, acc: &mut B::Tensor) -> Result<()> {
        Ok(self
            .backend
            .linear_add(x, &l.weight, l.bias.as_ref(), acc)?)
    }

    /// `acc += mlp(x)`.
    fn mlp_add(&self, x: &B::Tensor, w: &LayerWeights<B>, acc: &mut B::Tensor) -> Result<()> {
        let up = &w.h_to_4h;
        let h = self.backend.linear_gelu(x, &up.weight, up.bias.as_ref())?;
        self.linear_add(&h, &w.four_h_to_h, acc)
    }

    fn layer(
        &mut self,
        i: usize,
        mut x: B::Tensor,
        device: &B::Step,
        rows: usize,
    ) -> Result<B::Tensor> {
        let b = Arc::clone(&self.backend);
        let eps = self.cfg.layer_norm_epsilon;
        let w = &self.layers[i];
        let ln = |n: &weights::Norm<B>, t: &B::Tensor| b.layer_norm(t, &n.weight, &n.bias, eps);
        let pair = rows <= PAIR_MAX_ROWS;
        let kv = &mut self.kv;
        // Parallel attention for few-row steps is one backend call. Under a shared norm
        // the qkv and MLP up projections read the same input (on the GPU one launch for
        // both products, and the MLP down projection streaming while the attention
        // runs); under separate norms the whole MLP needs nothing from the attention (on
        // the GPU it runs beside it). Larger steps (prefill) compute the MLP after
        // attention, so that its rows x 4h activations are not held through it.
        let pw = ParallelWeights {
            qkv: w.qkv.parts(),
            up: w.h_to_4h.parts(),
            dense: w.dense.parts(),
            down: w.four_h_to_h.parts(),
        };
        match (&w.norms, pair) {
            (LayerNormWeights::Shared { input }, true) => {
                let a = ln(input, &x)?;
                b.parallel_attention(&a, &pw, kv, i, device, &self.attn, &mut x)?;
                return Ok(x);
            }
            (LayerNormWeights::Separate { attn, mlp }, true) => {
                let (a, m) = (ln(attn, &x)?, ln(mlp, &x)?);
                b.parallel_attention_separate(&a, &m, &pw, kv, i, device, &self.attn, &mut x)?;
                return Ok(x);
            }
            _ => {}
        }
        let attention =
            |qkv: &B::Tensor, kv: &mut B::KvCache| b.attention(qkv, kv, i, device, &self.attn);
        let (ctx, attn_in, mlp_in) = match &w.norms {
            LayerNormWeights::Separate { attn, mlp } => {
                let a = ln(attn, &x)?;
                let qkv = b.linear(&a, &w.qkv.weight, w.qkv.bias.as_ref())?;
                let m = ln(mlp, &x)?;
                (attention(&qkv, kv)?, a, Some(m))
            }
            LayerNormWeights::Shared { input } | LayerNormWeights::Sequential { input, .. } => {
                let a = ln(input, &x)?;
                let qkv = b.linear(&a, &w.qkv.weight, w.qkv.bias.as_ref())?;
                (attention(&qkv, kv)?, a, None)
            }
        };
        // Parallel attention: (x + attn(ln(x))) + mlp(ln'(x)); sequential: x + attn, then
        // + MLP of its norm.
        match &w.norms {
            LayerNormWeights::Sequential { post_attention, .. } => {
                self.linear_add(&ctx, &w.dense, &mut x)?;
                let normed = ln(post_attention, &x)?;
                self.mlp_add(&normed, w, &mut x)?;
            }
            _ => {
                self.linear_add(&ctx, &w.dense, &mut x)?;
                self.mlp_add(mlp_in.as_ref().unwrap_or(&attn_in), w, &mut x)?;
            }
        }
        Ok(x)
    }

    /// Final norm and LM head over the step's logit rows, left in backend memory.
    fn head_logits(&self, hidden: &B::Tensor, device: &B::Step) -> Result<B::Tensor> {
        let head = self.head.as_ref().ok_or(ForwardError::NotInShard {
            part: "output head",
        })?;
        let rows = self.backend.gather_logit_rows(hidden, device)?;
        let normed = self.backend.layer_norm(
            &rows,
            &head.ln_f.weight,
            &head.ln_f.bias,
            self.cfg.layer_norm_epsilon,
        )?;
        Ok(self.backend.linear(&normed, &head.lm_head, None)?)
    }

    /// A whole forward pass (this instance must hold every layer).
    pub fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<Logits>> {
        let step = self.prepare(chunks)?;
        let logits = self.step_logits(&step)?;
        self.logits_from(&logits, &step)
    }

    /// [`Falcon::forward`] returning greedy tokens instead of logits.
    pub fn forward_greedy(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<Vec<Option<u32>>>> {
        let step = self.prepare(chunks)?;
        let logits = self.step_logits(&step)?;
        self.greedy_from(&logits, &step)
    }

    /// Copy-on-write block copies requested by the KV pool.
    pub fn copy_kv_blocks(&mut self, copies: &[(u32, u32)]) -> Result<()> {
        if copies.is_empty() {
            return Ok(());
        }
        Ok(self.backend.copy_kv_blocks(&mut self.kv, copies)?)
    }
}
