//! The narrow set of operations a Falcon decoder needs, as a trait a compute backend
//! implements, and the metadata of one forward step.
//!
//! Designed for a GPU as much as for the CPU: tensors are opaque backend handles, the
//! per-step metadata (token ids, KV slots, rotary tables, block tables) goes to the
//! backend once per forward in [`Backend::prepare_step`], and nothing comes back to
//! the host but what the sampler needs: greedy tokens ([`Backend::argmax_rows`]),
//! sampling distributions ([`Backend::warp_rows`]) or raw logits ([`Backend::to_host`]).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use std::fmt::Debug;

use crate::checkpoint::HostTensor;
use crate::error::BackendError;
use crate::quant::{QuantMatrix, WeightFormat};
use crate::sampling::{SamplingError, SamplingParams};

/// Shape of a model's paged KV memory (only the kv heads are stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

/// Attention geometry of a model, fixed at load time.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnConfig {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Per-head ALiBi slopes (bf16-rounded); `None` for rotary models.
    pub alibi_slopes: Option<Vec<f32>>,
}

/// One sequence's part of a step: rows `first_row..first_row + num_rows` of the step's
/// tokens are positions `start_pos..start_pos + num_rows` of this sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqMeta {
    pub first_row: usize,
    pub num_rows: usize,
    pub start_pos: usize,
    /// KV block ids covering positions `0..start_pos + num_rows`.
    pub block_table: Vec<u32>,
}

/// Host-side description of one forward step over a batch of sequence chunks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepMeta {
    pub token_ids: Vec<u32>,
    /// KV slot (block * block_size + offset) each new token is written to.
    pub slots: Vec<u32>,
    /// `half_dim` cosines / sines per token row (empty for ALiBi models).
    pub rope_cos: Vec<f32>,
    pub rope_sin: Vec<f32>,
    pub seqs: Vec<SeqMeta>,
    /// Token rows whose logits are wanted, in output order.
    pub logit_rows: Vec<u32>,
    pub block_size: usize,
}

/// One logit row for [`Backend::warp_rows`].
#[derive(Debug, Clone, Copy)]
pub struct WarpRow<'a> {
    /// Row of the logits tensor.
    pub row: usize,
    pub params: &'a SamplingParams,
    /// Tokens the repetition penalty looks at (everything before the predicted one).
    pub context: &'a [u32],
}

/// The four products of a parallel-attention layer ([`Backend::parallel_attention`]):
/// each a weight `[out, in]` and its optional bias.
#[derive(Debug)]
pub struct ParallelWeights<'a, T> {
    pub qkv: (&'a T, Option<&'a T>),
    pub up: (&'a T, Option<&'a T>),
    pub dense: (&'a T, Option<&'a T>),
    pub down: (&'a T, Option<&'a T>),
}

/// [`Backend::parallel_attention_separate`] one product after the other, in the order
/// it defines (its default; a backend that overrides it and does not fork runs this, so
/// that forked and unforked layers add alike).
#[allow(clippy::too_many_arguments)]
pub fn parallel_attention_separate_in_order<B: Backend + ?Sized>(
    b: &B,
    a: &B::Tensor,
    m: &B::Tensor,
    w: &ParallelWeights<'_, B::Tensor>,
    kv: &mut B::KvCache,
    layer: usize,
    step: &B::Step,
    attn: &AttnConfig,
    acc: &mut B::Tensor,
) -> Result<(), BackendError> {
    let qkv = b.linear(a, w.qkv.0, w.qkv.1)?;
    let ctx = b.attention(&qkv, kv, layer, step, attn)?;
    b.linear_add(&ctx, w.dense.0, w.dense.1, acc)?;
    let h = b.linear_gelu(m, w.up.0, w.up.1)?;
    b.linear_add(&h, w.down.0, w.down.1, acc)
}

/// Per row of [`Backend::warp_rows`]: the distribution, or why the row has none.
pub type WarpedRows = Vec<Result<Vec<f32>, SamplingError>>;

/// Row `row` of `cols` values copied to the host, or an error when the data is shorter.
pub fn host_row<'a>(
    op: &'static str,
    data: &'a [f32],
    cols: usize,
    row: usize,
) -> Result<&'a [f32], BackendError> {
    data.get(row * cols..(row + 1) * cols)
        .ok_or(BackendError::Device {
            op,
            message: format!("row {row} of a {}-entry tensor", data.len()),
        })
}

/// [`Backend::penalized_argmax_rows`] on rows of `cols` values already on the host.
pub fn penalized_argmax_on_host(
    data: &[f32],
    cols: usize,
    rows: &[WarpRow<'_>],
) -> Result<Vec<Option<u32>>, BackendError> {
    rows.iter()
        .map(|r| {
            let mut row = host_row("penalized_argmax_rows", data, cols, r.row)?.to_vec();
            crate::sampling::apply_repetition_penalty(
                &mut row,
                r.context,
                r.params.repetition_penalty,
            );
            Ok(crate::sampling::greedy_token(&row))
        })
        .collect()
}

/// One step's work on one model or pipeline shard ([`Backend::run_step`]): from its
/// input activations (`None`: the embeddings) to its output (the logit rows, or the
/// hidden state for the next shard).
pub type StepPass<'a, B, E> = dyn FnMut(
        &<B as Backend>::Step,
        Option<<B as Backend>::Tensor>,
    ) -> Result<<B as Backend>::Tensor, E>
    + 'a;

/// The operations of a Falcon forward pass. Tensors are row-major `[rows, cols]`.
pub trait Backend: Send + Sync + Debug + 'static {
    /// A tensor in backend memory.
    type Tensor: Send + Sync + Debug;
    /// The paged KV memory of one model (or shard).
    type KvCache: Send + Sync + Debug;
    /// One step's metadata, resident where the kernels can read it.
    type Step: Send + Sync + Debug;
    /// Recordings of one model's forward steps that the backend replays instead of
    /// queueing each kernel again (CUDA graphs), or `()`. Each model instance keeps its
    /// own: a recording addresses that model's weights and KV cache.
    type StepGraphs: Default + Send + Sync + Debug;

    fn name(&self) -> &'static str;

    /// Copies a checkpoint tensor (any supported dtype) into backend memory.
    fn upload(&self, tensor: &HostTensor<'_>) -> Result<Self::Tensor, BackendError>;

    /// Whether [`Backend::upload_quantized`] takes linear weights in `format`
    /// ([`WeightFormat::Checkpoint`], through [`Backend::upload`], always).
    fn supports_weights(&self, format: WeightFormat) -> bool {
        format == WeightFormat::Checkpoint
    }

    /// Copies a quantized linear weight into backend memory, kept in its integer format.
    /// The products of [`Backend::linear`] and its fused forms with it compute with the
    /// values of [`QuantMatrix::dequantize`] (the CPU exactly: its products equal those
    /// of that f32 matrix uploaded as a plain weight; a backend may round them as it
    /// rounds a plain weight where it multiplies in lower precision). Every row of a
    /// product must get the same bits whatever the other rows, as with plain weights.
    fn upload_quantized(&self, weight: QuantMatrix) -> Result<Self::Tensor, BackendError> {
        Err(BackendError::WeightFormat {
            backend: self.name(),
            format: weight.format(),
        })
    }

    /// Bytes of backend memory `tensor` holds (for weights: what a model's load costs).
    fn tensor_bytes(&self, tensor: &Self::Tensor) -> usize;

    fn alloc_kv(&self, layout: &KvLayout) -> Result<Self::KvCache, BackendError>;

    fn prepare_step(&self, meta: &StepMeta) -> Result<Self::Step, BackendError>;

    /// Rows of `table` selected by the step's token ids.
    fn embed(&self, table: &Self::Tensor, step: &Self::Step) -> Result<Self::Tensor, BackendError>;

    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor, BackendError>;

    /// `x @ weight^T + bias`, weight stored `[out, in]` as in the checkpoint.
    fn linear(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor, BackendError>;

    /// Exact (erf) GELU, in place.
    fn gelu(&self, x: &mut Self::Tensor) -> Result<(), BackendError>;

    /// `gelu(x @ weight^T + bias)`. Backends may fuse the two; the result must equal
    /// `linear` then `gelu` bit for bit.
    fn linear_gelu(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor, BackendError> {
        let mut y = self.linear(x, weight, bias)?;
        self.gelu(&mut y)?;
        Ok(y)
    }

    /// `(x @ a^T + a_bias, gelu(x @ b^T + b_bias))`: two products of one input (Falcon's
    /// qkv and MLP up projection under a shared norm). Backends may run them as one
    /// launch; each result must equal `linear` and `linear_gelu` bit for bit.
    fn linear_and_gelu(
        &self,
        x: &Self::Tensor,
        a: &Self::Tensor,
        a_bias: Option<&Self::Tensor>,
        b: &Self::Tensor,
        b_bias: Option<&Self::Tensor>,
    ) -> Result<(Self::Tensor, Self::Tensor), BackendError> {
        Ok((self.linear(x, a, a_bias)?, self.linear_gelu(x, b, b_bias)?))
    }

    /// `(attention(x @ qkv^T + qkv_bias), gelu(x @ up^T + up_bias))`: a layer's qkv
    /// projection through [`Backend::attention`] (writing the layer's KV), and the MLP
    /// up projection kept for later (Falcon under a shared norm). Backends may apply the
    /// rotary and write the cache in the projection itself; the results must equal
    /// [`Backend::linear_and_gelu`] then [`Backend::attention`] bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn attention_and_gelu(
        &self,
        x: &Self::Tensor,
        qkv: &Self::Tensor,
        qkv_bias: Option<&Self::Tensor>,
        up: &Self::Tensor,
        up_bias: Option<&Self::Tensor>,
        kv: &mut Self::KvCache,
        layer: usize,
        step: &Self::Step,
        attn: &AttnConfig,
    ) -> Result<(Self::Tensor, Self::Tensor), BackendError> {
        let (y, up) = self.linear_and_gelu(x, qkv, qkv_bias, up, up_bias)?;
        Ok((self.attention(&y, kv, layer, step, attn)?, up))
    }

    /// `acc += x @ weight^T + bias` (a residual stream). Backends may fuse the two; the
    /// result must equal `linear` then `add` bit for bit.
    fn linear_add(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        acc: &mut Self::Tensor,
    ) -> Result<(), BackendError> {
        let y = self.linear(x, weight, bias)?;
        self.add(acc, &y)
    }

    /// `acc += (a_x @ a^T + a_bias) + (b_x @ b^T + b_bias)`: Falcon's parallel-attention
    /// residual (attention output and MLP down projections). By default two
    /// [`Backend::linear_add`] calls in that order; a backend may instead sum both
    /// products as one, rounded differently, where no other step must match it bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn linear_add_sum(
        &self,
        a_x: &Self::Tensor,
        a: &Self::Tensor,
        a_bias: Option<&Self::Tensor>,
        b_x: &Self::Tensor,
        b: &Self::Tensor,
        b_bias: Option<&Self::Tensor>,
        acc: &mut Self::Tensor,
    ) -> Result<(), BackendError> {
        self.linear_add(a_x, a, a_bias, acc)?;
        self.linear_add(b_x, b, b_bias, acc)
    }

    /// A parallel-attention layer after its shared norm `x`, for a few-row step:
    /// `acc += dense(attention(qkv(x))) + down(gelu(up(x)))`. By default
    /// [`Backend::attention_and_gelu`] then [`Backend::linear_add_sum`]; a backend may
    /// also start the MLP down projection, whose input is ready before the attention's,
    /// while the attention runs (rounded as `linear_add_sum` may round).
    #[allow(clippy::too_many_arguments)]
    fn parallel_attention(
        &self,
        x: &Self::Tensor,
        w: &ParallelWeights<'_, Self::Tensor>,
        kv: &mut Self::KvCache,
        layer: usize,
        step: &Self::Step,
        attn: &AttnConfig,
        acc: &mut Self::Tensor,
    ) -> Result<(), BackendError> {
        let (ctx, up) =
            self.attention_and_gelu(x, w.qkv.0, w.qkv.1, w.up.0, w.up.1, kv, layer, step, attn)?;
        self.linear_add_sum(&ctx, w.dense.0, w.dense.1, &up, w.down.0, w.down.1, acc)
    }

    /// A parallel-attention layer whose attention and MLP have norms of their own
    /// (Falcon's new decoder architecture), for a few-row step: `acc +=
    /// dense(attention(qkv(a)))`, then `acc += down(gelu(up(m)))`, for the attention's
    /// normed input `a` and the MLP's `m`. A backend may run the MLP, which needs nothing
    /// from the attention, beside it, adding in this order.
    #[allow(clippy::too_many_arguments)]
    fn parallel_attention_separate(
        &self,
        a: &Self::Tensor,
        m: &Self::Tensor,
        w: &ParallelWeights<'_, Self::Tensor>,
        kv: &mut Self::KvCache,
        layer: usize,
        step: &Self::Step,
        attn: &AttnConfig,
        acc: &mut Self::Tensor,
    ) -> Result<(), BackendError> {
        parallel_attention_separate_in_order(self, a, m, w, kv, layer, step, attn, acc)
    }

    /// `x += y`, in place.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<(), BackendError>;

    /// Splits the fused qkv rows (`[groups, q_per_kv + 2, head_dim]` per token), applies
    /// the step's rotary tables to queries and keys, writes keys and values into `layer`
    /// of the KV cache at the step's slots, then attends causally over each sequence's
    /// cached positions. Returns `[rows, num_heads * head_dim]`.
    fn attention(
        &self,
        qkv: &Self::Tensor,
        kv: &mut Self::KvCache,
        layer: usize,
        step: &Self::Step,
        attn: &AttnConfig,
    ) -> Result<Self::Tensor, BackendError>;

    /// The step's logit rows of `x`.
    fn gather_logit_rows(
        &self,
        x: &Self::Tensor,
        step: &Self::Step,
    ) -> Result<Self::Tensor, BackendError>;

    /// The greedy token of each row of `x` (`cols` wide): the index of its largest
    /// value, the first on ties, NaN skipped, exactly as [`crate::sampling::argmax`];
    /// `None` for a row of nothing but NaN and -inf. Backends may compute it where the
    /// logits are, so that greedy steps do not copy them.
    fn argmax_rows(&self, x: &Self::Tensor, cols: usize) -> Result<Vec<Option<u32>>, BackendError> {
        let data = self.to_host(x)?;
        Ok(data
            .chunks(cols.max(1))
            .map(crate::sampling::greedy_token)
            .collect())
    }

    /// The distribution each row's token is drawn from: [`crate::sampling::warp_penalised`]
    /// of row `row` of `x` (`cols` wide) with its parameters and context. Backends may
    /// compute it where the logits are, so that no row is sorted on the host; results may
    /// differ from the host's f64 arithmetic by f32 rounding.
    fn warp_rows(
        &self,
        x: &Self::Tensor,
        cols: usize,
        rows: &[WarpRow<'_>],
    ) -> Result<WarpedRows, BackendError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let data = self.to_host(x)?;
        rows.iter()
            .map(|r| {
                let row = host_row("warp_rows", &data, cols, r.row)?;
                Ok(crate::sampling::warp_penalised(row, r.context, r.params))
            })
            .collect()
    }

    /// The greedy token of each row after [`crate::sampling::apply_repetition_penalty`]
    /// with its context (greedy decoding with a penalty): as [`Backend::argmax_rows`] of
    /// the penalised row. Backends may compute it where the logits are.
    fn penalized_argmax_rows(
        &self,
        x: &Self::Tensor,
        cols: usize,
        rows: &[WarpRow<'_>],
    ) -> Result<Vec<Option<u32>>, BackendError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        penalized_argmax_on_host(&self.to_host(x)?, cols, rows)
    }

    /// Reads a tensor back to the host (used for logits and shard hand-offs).
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>, BackendError>;

    /// Builds a `[rows, cols]` activation tensor from host data (shard hand-offs).
    fn upload_hidden(
        &self,
        data: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self::Tensor, BackendError>;

    /// Makes a hidden state from the pipeline shard before, which may run on another
    /// instance of this backend (another GPU), usable by this one. By default it is.
    fn receive_hidden(&self, x: Self::Tensor) -> Result<Self::Tensor, BackendError> {
        Ok(x)
    }

    /// Runs `pass`, one step's work on a model or pipeline shard over the given step
    /// and input, or replays a recording of it: a backend that records steps records
    /// one the second time it sees its shape (and input shape) and replays it for
    /// every later step of that shape, which must give the same bits. `pass` may only
    /// queue backend work (no reads to the host) and must do the same for every step of
    /// a shape. The default runs `pass` on `step` and `input`.
    fn run_step<E: From<BackendError> + std::fmt::Display>(
        &self,
        graphs: &mut Self::StepGraphs,
        step: &Self::Step,
        input: Option<Self::Tensor>,
        pass: &mut StepPass<'_, Self, E>,
    ) -> Result<Self::Tensor, E> {
        let _ = graphs;
        pass(step, input)
    }

    /// Copies whole KV blocks `src -> dst` in every layer (copy-on-write of shared prefixes).
    fn copy_kv_blocks(
        &self,
        kv: &mut Self::KvCache,
        copies: &[(u32, u32)],
    ) -> Result<(), BackendError>;
}
