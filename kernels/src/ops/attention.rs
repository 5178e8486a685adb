//! The paged KV cache and attention launchers: rotary + KV write, then the prefill,
//! decode (CUDA-core, split over long contexts) and combine kernels of `attention.cu`,
//! and the tensor-core decode kernel of `attention_tc_decode.cu`.

use half::bf16;

use super::{check_len, p, to_i32};
use crate::error::KernelError;
use cudarc::driver::CudaFunction;

use crate::gpu::{Arg, DeviceBuffer, Gpu};
use crate::graph::Bound;
use crate::step::DeviceStep;

const DEC_TK: usize = 32;
/// The shortest split of the CUDA-core decode kernels (a multiple of their key tile),
/// which contexts are classed by; a step's splits are [`Gpu::attn_split_keys`] long, the
/// same for every step, so that a row's result does not depend on its step's other rows
/// (the tensor-core kernel's are `DTC_SPLIT_KEYS`).
const DEC_SPLIT_KEYS: usize = 64;
/// Splits whose weights `attn_combine` keeps in shared memory (more still combine, with
/// weight 0: never produced, the launchers stay below).
const COMBINE_MAX_SPLITS: usize = 1024;
/// `attn_combine`: threads per block, accumulators per output column.
const COMBINE_THREADS: u32 = 1024;
const COMBINE_GROUPS: usize = 16;
/// Tensor-core decode attention (`attn_decode_tc*`, attention_tc_decode.cu): keys per
/// split (fixed: `DTC_SPLIT`), per tile and tiles per split, query heads per block.
const DTC_SPLIT_KEYS: usize = DTC_TILES * DTC_TILE_KEYS;
const DTC_TILE_KEYS: usize = 64;
const DTC_TILES: usize = 4;
const DTC_MAX_HEADS: usize = 128;
const DEC_WARPS: usize = 8;
const DEC_THREADS: u32 = 32 * DEC_WARPS as u32;
/// Shared memory a block may use without opting in.
const SMEM_FLOATS: usize = 48 * 1024 / 4;
/// Static shared memory of the CUDA-core decode kernels (`merge_splits_if_last`'s flag,
/// rounded up to 16 bytes), in floats.
const DEC_STATIC_FLOATS: usize = 4;

/// The paged KV memory of one model (or shard): `[layer][slot][kv_head][head_dim]`
/// bf16 for keys and for values.
#[derive(Debug)]
pub struct KvBuffers {
    pub(crate) k: DeviceBuffer<bf16>,
    pub(crate) v: DeviceBuffer<bf16>,
    layers: usize,
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvBuffers {
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Device bytes of keys and values together.
    pub fn byte_size(&self) -> usize {
        self.k.num_bytes() + self.v.num_bytes()
    }

    /// Bytes one token occupies: K and V, every layer, bf16.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * std::mem::size_of::<bf16>()
    }

    fn layer_elems(&self) -> usize {
        self.num_slots() * self.kv_heads * self.head_dim
    }
}

/// Attention geometry for [`Gpu::attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams<'a> {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Per-head ALiBi slopes (`num_heads` values) for ALiBi models.
    pub alibi_slopes: Option<&'a DeviceBuffer<f32>>,
}

const ATTN_OP: &str = "attention";

/// A layer's attention geometry, checked against its cache and step
/// ([`Gpu::attention_geometry`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnGeometry<'a> {
    pub(crate) nh: usize,
    pub(crate) kvh: usize,
    pub(crate) hd: usize,
    /// Query heads per kv head.
    pub(crate) qpg: usize,
    /// Whether the step carries rotary tables.
    pub(crate) rotary: bool,
    /// The layer's first element in the cache.
    pub(crate) layer_off: u64,
    pub(crate) slopes: Option<&'a DeviceBuffer<f32>>,
}

impl AttnGeometry<'_> {
    /// Width of a fused qkv row: `[kv_heads][q_per_kv + 2][head_dim]`.
    pub(crate) fn qkv_cols(&self) -> usize {
        self.kvh * (self.qpg + 2) * self.hd
    }

    /// The arguments rope_qkv and gemv2_rope_bf16_r1 end with: where queries, keys and
    /// values go and the step's slots and rotary tables, then the rotary flag, head
    /// counts, head size and the layer's offset in the cache.
    pub(crate) fn rope_args(
        &self,
        q: &DeviceBuffer<f32>,
        kv: &KvBuffers,
        step: &DeviceStep,
    ) -> Result<[Arg; 11], KernelError> {
        Ok([
            p(q),
            p(&kv.k),
            p(&kv.v),
            Arg::U64(step.at(step.off.slots)),
            Arg::U64(step.at(step.off.cos)),
            Arg::U64(step.at(step.off.sin)),
            Arg::I32(i32::from(self.rotary)),
            Arg::I32(to_i32(ATTN_OP, self.nh)?),
            Arg::I32(to_i32(ATTN_OP, self.kvh)?),
            Arg::I32(to_i32(ATTN_OP, self.hd)?),
            Arg::U64(self.layer_off),
        ])
    }
}

/// The operands every decode-attention launch of one layer shares.
struct Decode<'a> {
    q: Arg,
    out: Arg,
    k: Arg,
    v: Arg,
    layer_off: u64,
    step: &'a DeviceStep,
    slopes: Arg,
    has_alibi: i32,
    nh: usize,
    kvh: usize,
    hd: usize,
    scale: f32,
}

impl Decode<'_> {
    /// The arguments both decode kernels start with: operands, the listed rows and the
    /// step's metadata, outputs (`po`, `pm`: the split partials) and head counts.
    fn args(&self, list: usize, po: Arg, pm: Arg) -> Result<Vec<Arg>, KernelError> {
        Ok(vec![
            self.q,
            self.k,
            self.v,
            Arg::U64(self.layer_off),
            Arg::U64(self.step.at(list)),
            Arg::U64(self.step.at(self.step.off.row_info)),
            Arg::U64(self.step.at(self.step.off.seq_info)),
            Arg::U64(self.step.at(self.step.off.block_tables)),
            Arg::I32(self.step.block_size as i32),
            self.slopes,
            Arg::I32(self.has_alibi),
            self.out,
            po,
            pm,
            Arg::I32(to_i32("attention", self.nh)?),
            Arg::I32(to_i32("attention", self.kvh)?),
        ])
    }
}

/// Longest context whose decode attention grids depend only on its class.
const CLASSED_CTX: usize = DEC_SPLIT_KEYS * COMBINE_MAX_SPLITS;

/// The context a decode attention launch is sized for: up to `CLASSED_CTX` keys, the
/// step's longest context rounded up to a power of two (at least one split). Splits past
/// a row's own context hold no keys and change no bit of its output (`attn_combine`
/// weighs them 0 and sums in a fixed tree), so this changes no result; it makes every
/// step whose longest context is in one class launch the same grids, so that a
/// recorded step is recorded anew only when the context doubles. Beyond, the context
/// itself (the CUDA-core kernel's splits widen with it there).
pub(crate) fn grid_ctx(ctx: usize) -> usize {
    if ctx <= CLASSED_CTX {
        ctx.next_power_of_two().max(DEC_SPLIT_KEYS)
    } else {
        ctx
    }
}

/// The class of a context of `ctx` keys (the context its launches are sized for), which
/// a recorded step's shape keys on; `None` past the classed contexts.
pub(crate) fn ctx_class(ctx: usize) -> Option<usize> {
    (ctx <= CLASSED_CTX).then(|| grid_ctx(ctx))
}

/// The longest context of `ctx`'s class.
pub(crate) fn ctx_class_limit(ctx: usize) -> usize {
    grid_ctx(ctx)
}

const _: () = assert!(DTC_SPLIT_KEYS.is_multiple_of(DEC_SPLIT_KEYS));

/// Splits of a decode attention over `max_ctx` keys: `keys` each (more only past
/// `COMBINE_MAX_SPLITS` splits), so that split boundaries do not depend on the other
/// rows of a step. Returns (splits, keys per split).
fn fixed_splits(max_ctx: usize, keys: usize) -> (usize, usize) {
    let per = keys.max(max_ctx.div_ceil(COMBINE_MAX_SPLITS).next_multiple_of(keys));
    (max_ctx.div_ceil(per).max(1), per)
}

/// Launch shape of `attn_decode_tc*` for `qpg` query heads per kv head of size `hd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcDecodeShape {
    /// Key groups (warps that take every `key_groups`-th tile of a split). A function of
    /// the head counts only, so that rows stay step-invariant.
    pub key_groups: usize,
    pub warps: usize,
    /// Dynamic shared memory: the split's K and V tiles, or the merge areas, whichever
    /// is larger (as `attn_dec_tc` lays them out).
    pub smem_bytes: usize,
}

impl TcDecodeShape {
    /// The kernels' launch bounds: 12 warps at head size 64 (16 would cap registers at
    /// 128 and spill), 8 at 128.
    fn max_warps(hd: usize) -> usize {
        if hd == 64 {
            12
        } else {
            8
        }
    }

    pub(crate) fn new(qpg: usize, hd: usize) -> Self {
        let m_tiles = qpg.min(DTC_MAX_HEADS).div_ceil(16).max(1);
        let key_groups = [4, 2, 1]
            .into_iter()
            .find(|&k| m_tiles * k <= Self::max_warps(hd))
            .unwrap_or(1);
        let warps = m_tiles * key_groups;
        let tiles = 2 * DTC_TILES * DTC_TILE_KEYS * (hd + 8) * 2;
        let results = if key_groups > 1 { m_tiles * 16 } else { 0 };
        let merge = (warps * 16 + results) * (hd + 4) * 4;
        TcDecodeShape {
            key_groups,
            warps,
            smem_bytes: tiles.max(merge),
        }
    }

    /// The most dynamic shared memory the kernel of head size `hd` needs for any head
    /// count (what its launches are allowed once, at load).
    pub(crate) fn max_smem_bytes(hd: usize) -> usize {
        (1..=DTC_MAX_HEADS / 16)
            .map(|m| Self::new(16 * m, hd).smem_bytes)
            .max()
            .unwrap_or(0)
    }
}

impl Gpu {
    /// Zeroed KV memory for `layers` layers of `num_blocks` blocks.
    pub fn alloc_kv(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<KvBuffers, KernelError> {
        if block_size == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(KernelError::invalid(
                "alloc_kv",
                "zero block size, kv heads or head dim",
            ));
        }
        let n = layers * num_blocks * block_size * kv_heads * head_dim;
        Ok(KvBuffers {
            k: self.zeros::<bf16>(n)?,
            v: self.zeros::<bf16>(n)?,
            layers,
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
        })
    }

    /// Fills keys and values with seeded uniform values in `(-scale, scale)` (benchmarks
    /// of long contexts without running the prefill).
    pub fn fill_kv_uniform(
        &self,
        kv: &mut KvBuffers,
        seed: u64,
        scale: f32,
    ) -> Result<(), KernelError> {
        self.fill_uniform_bf16(&mut kv.k, seed, scale)?;
        self.fill_uniform_bf16(&mut kv.v, seed ^ 0x5bd1_e995, scale)
    }

    /// Copies whole blocks `src -> dst` in every layer.
    pub fn copy_kv_blocks(
        &self,
        kv: &mut KvBuffers,
        copies: &[(u32, u32)],
    ) -> Result<(), KernelError> {
        if copies.is_empty() || kv.layers == 0 {
            return Ok(());
        }
        let mut pairs = Vec::with_capacity(2 * copies.len());
        for &(s, d) in copies {
            if s as usize >= kv.num_blocks || d as usize >= kv.num_blocks {
                return Err(KernelError::invalid(
                    "copy_kv_blocks",
                    format!("block {} outside {}", s.max(d), kv.num_blocks),
                ));
            }
            pairs.extend([s, d]);
        }
        let pairs = self.upload(&pairs)?;
        let block_elems = kv.block_size * kv.kv_heads * kv.head_dim;
        self.launch(
            &self.k.copy_kv_blocks,
            (copies.len() as u32, kv.layers as u32, 1),
            256,
            0,
            &[
                p(&kv.k),
                p(&kv.v),
                p(&pairs),
                Arg::U64(kv.layer_elems() as u64),
                Arg::U64(block_elems as u64),
            ],
        )
    }

    /// Rotary + KV write + causal attention for one layer (see `attention.cu`).
    /// `qkv` is `[rows, kv_heads * (q_per_kv + 2) * head_dim]`; returns
    /// `[rows, heads * head_dim]`.
    pub fn attention(
        &self,
        qkv: &DeviceBuffer<f32>,
        kv: &mut KvBuffers,
        layer: usize,
        step: &DeviceStep,
        a: &AttentionParams<'_>,
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        let g = self.attention_geometry(kv, layer, step, a)?;
        let rows = step.rows;
        check_len(ATTN_OP, "qkv", qkv, rows * g.qkv_cols())?;
        let q = self.scratch::<f32>(rows * g.nh * g.hd)?;
        let mut args = vec![p(qkv)];
        args.extend(g.rope_args(&q, kv, step)?);
        let blocks_z = ((g.qpg + 2) * g.hd).div_ceil(256) as u32;
        self.launch(
            &self.k.rope_qkv,
            (rows as u32, g.kvh as u32, blocks_z),
            256,
            0,
            &args,
        )?;
        self.attend(&q, kv, step, &g)
    }

    /// Checks a layer's attention operands against the cache and the step (noting the
    /// step's index bounds for a recording), and works out the launch geometry.
    pub(crate) fn attention_geometry<'a>(
        &self,
        kv: &KvBuffers,
        layer: usize,
        step: &DeviceStep,
        a: &AttentionParams<'a>,
    ) -> Result<AttnGeometry<'a>, KernelError> {
        const OP: &str = ATTN_OP;
        let (nh, kvh, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        if kvh == 0 || nh % kvh != 0 || hd == 0 {
            return Err(KernelError::invalid(
                OP,
                format!("{nh} heads over {kvh} kv heads of {hd}"),
            ));
        }
        if layer >= kv.layers || kv.kv_heads != kvh || kv.head_dim != hd {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "layer {layer} / {kvh} kv heads of {hd} do not fit a cache of {} layers, {} kv heads of {}",
                    kv.layers, kv.kv_heads, kv.head_dim
                ),
            ));
        }
        if step.block_size != kv.block_size
            || step.max_slot as usize >= kv.num_slots()
            || step.max_block as usize >= kv.num_blocks
        {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "step (block size {}, slot {}, block {}) does not fit the cache ({} blocks of {})",
                    step.block_size, step.max_slot, step.max_block, kv.num_blocks, kv.block_size
                ),
            ));
        }
        self.note_limit(Bound::Slots, kv.num_slots());
        self.note_limit(Bound::Blocks, kv.num_blocks);
        let rotary = step.half_dim > 0;
        if rotary && 2 * step.half_dim != hd {
            return Err(KernelError::invalid(
                OP,
                format!("rotary tables of {} pairs for head dim {hd}", step.half_dim),
            ));
        }
        if let Some(s) = a.alibi_slopes {
            check_len(OP, "alibi slopes", s, nh)?;
        }
        Ok(AttnGeometry {
            nh,
            kvh,
            hd,
            qpg: nh / kvh,
            rotary,
            layer_off: (layer * kv.layer_elems()) as u64,
            slopes: a.alibi_slopes,
        })
    }

    /// Causal attention of the step's queries `q` (`[rows, heads, head_dim]`, rotary
    /// applied) over the layer's cache, the step's keys and values already written.
    pub(crate) fn attend(
        &self,
        q: &DeviceBuffer<f32>,
        kv: &KvBuffers,
        step: &DeviceStep,
        g: &AttnGeometry<'_>,
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        let rows = step.rows;
        let (nh, kvh, hd) = (g.nh, g.kvh, g.hd);
        let qpg = g.qpg;
        check_len(ATTN_OP, "q", q, rows * nh * hd)?;
        let (nhi, kvhi) = (to_i32(ATTN_OP, nh)?, to_i32(ATTN_OP, kvh)?);
        let layer_off = g.layer_off;
        let (slopes, has_alibi) = match g.slopes {
            Some(s) => (p(s), 1),
            None => (p(q), 0),
        };
        let out = self.scratch::<f32>(rows * nh * hd)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let tc = match hd {
            64 => Some(&self.k.attn_prefill_tc64),
            128 => Some(&self.k.attn_prefill_tc128),
            _ => None,
        };
        let (list, n_list, max_ctx) = match tc {
            Some(func) if step.n_tiles > 0 => {
                self.launch(
                    func,
                    (step.n_tiles as u32, nh as u32, 1),
                    128,
                    0,
                    &[
                        p(q),
                        p(&kv.k),
                        p(&kv.v),
                        Arg::U64(layer_off),
                        Arg::U64(step.at(step.off.tiles)),
                        Arg::U64(step.at(step.off.seq_info)),
                        Arg::U64(step.at(step.off.block_tables)),
                        Arg::I32(step.block_size as i32),
                        slopes,
                        Arg::I32(has_alibi),
                        p(&out),
                        Arg::I32(nhi),
                        Arg::I32(kvhi),
                        Arg::F32(scale),
                    ],
                )?;
                (step.off.small_rows, step.n_small_rows, step.max_ctx_small)
            }
            _ => (step.off.all_rows, rows, step.max_ctx),
        };
        if n_list == 0 {
            return Ok(out);
        }
        let d = Decode {
            q: p(q),
            out: p(&out),
            k: p(&kv.k),
            v: p(&kv.v),
            layer_off,
            step,
            slopes,
            has_alibi,
            nh,
            kvh,
            hd,
            scale,
        };
        // Many query heads per kv head over a long context: tensor cores, the heads of a
        // token as the rows of the mma tiles. Which kernel a row takes depends only on
        // its own context (the step's lists are split by it), and both kernels split the
        // context at fixed key counts, so a row gets the same bits in a one-token step
        // as in a verify pass (greedy speculation relies on that).
        // (With these head sizes the prefill kernel exists too, so `list` holds exactly
        // the step's short and long rows.) Beyond COMBINE_MAX_SPLITS splits of fixed size
        // (over 262k keys), and where the device cannot give the kernel the shared memory
        // it needs, the CUDA-core kernel takes them.
        let shape = TcDecodeShape::new(qpg, hd);
        let dec_tc = match hd {
            64 => Some((&self.k.attn_decode_tc64, self.k.attn_decode_tc_smem[0])),
            128 => Some((&self.k.attn_decode_tc128, self.k.attn_decode_tc_smem[1])),
            _ => None,
        }
        .filter(|&(_, smem)| {
            qpg >= 16
                && shape.smem_bytes <= smem
                && step.max_ctx_long <= DTC_SPLIT_KEYS * COMBINE_MAX_SPLITS
        })
        .map(|(func, _)| func);
        match dec_tc {
            Some(func) => {
                if step.n_long_rows > 0 {
                    self.decode_tc(
                        func,
                        shape,
                        &d,
                        step.off.long_rows,
                        step.n_long_rows,
                        step.max_ctx_long,
                    )?;
                }
                if step.n_short_rows > 0 {
                    self.decode_simt(
                        &d,
                        step.off.short_rows,
                        step.n_short_rows,
                        step.max_ctx_short,
                    )?;
                }
            }
            None => self.decode_simt(&d, list, n_list, max_ctx)?,
        }
        Ok(out)
    }

    /// `attn_decode_tc*` over the listed rows, then `attn_combine` when split.
    #[allow(clippy::too_many_arguments)]
    fn decode_tc(
        &self,
        func: &CudaFunction,
        shape: TcDecodeShape,
        d: &Decode<'_>,
        list: usize,
        n_list: usize,
        max_ctx: usize,
    ) -> Result<(), KernelError> {
        let tiles = (d.nh / d.kvh).div_ceil(DTC_MAX_HEADS);
        let nsplit = grid_ctx(max_ctx).div_ceil(DTC_SPLIT_KEYS).max(1);
        let (_parts, po, pm) = self.partials(d, nsplit)?;
        let mut args = d.args(list, po, pm)?;
        args.extend([
            Arg::I32(shape.key_groups as i32),
            Arg::F32(d.scale),
            Arg::I32(self.early_kv().into()),
        ]);
        self.launch(
            func,
            (n_list as u32, (d.kvh * tiles) as u32, nsplit as u32),
            32 * shape.warps as u32,
            shape.smem_bytes as u32,
            &args,
        )?;
        self.combine(d, list, n_list, nsplit, po, pm)
    }

    /// `attn_decode*` (CUDA cores, any head size) over the listed rows, then
    /// `attn_combine` when split.
    fn decode_simt(
        &self,
        d: &Decode<'_>,
        list: usize,
        n_list: usize,
        max_ctx: usize,
    ) -> Result<(), KernelError> {
        const OP: &str = "attention";
        let (nh, kvh, hd) = (d.nh, d.kvh, d.hd);
        let qpg = nh / kvh;
        // The compile-time head sizes take the vectorised kernel (K rows padded by 4
        // floats instead of 1).
        let (decode, pad, fixed_hd) = match hd {
            64 => (&self.k.attn_decode_hd64, 4, true),
            128 => (&self.k.attn_decode_hd128, 4, true),
            _ => (&self.k.attn_decode, 1, false),
        };
        // Heads per block: one per warp at most (more blocks for MQA's 71 heads), and
        // what fits 48 KiB of shared memory, less the kernels' static shared memory (the
        // split merge's flag), which counts towards the same 48 KiB.
        let fixed = DEC_TK * (hd + pad) + DEC_TK * hd + 8 * 32;
        let per_head = 2 * hd + 2;
        let max_hb = (SMEM_FLOATS - DEC_STATIC_FLOATS).saturating_sub(fixed) / per_head;
        if max_hb == 0 {
            return Err(KernelError::invalid(
                OP,
                format!("head dim {hd} is too large"),
            ));
        }
        let chunks0 = qpg.div_ceil(max_hb.min(DEC_WARPS));
        let hb = qpg.div_ceil(chunks0);
        let chunks = qpg.div_ceil(hb);
        let (nsplit, keys_per_split) = fixed_splits(grid_ctx(max_ctx), self.attn_split_keys());
        let smem = ((2 * hb * hd + 2 * hb + fixed) * 4) as u32;
        let (_parts, po, pm) = self.partials(d, nsplit)?;
        // Split rows merged by the kernel's last block per (row, head chunk), or by
        // attn_combine after it.
        let merge = nsplit > 1 && self.fuse_combine();
        let counters = if merge {
            self.gemv_counters(n_list * kvh * chunks)?
        } else {
            0
        };
        let mut args = d.args(list, po, pm)?;
        args.extend([
            Arg::I32(to_i32(OP, hd)?),
            Arg::I32(hb as i32),
            Arg::I32(to_i32(OP, keys_per_split)?),
            Arg::F32(d.scale),
            Arg::U64(counters),
        ]);
        // Only the compile-time head sizes load keys before their PDL wait.
        if fixed_hd {
            args.push(Arg::I32(self.early_kv().into()));
        }
        self.launch(
            decode,
            (n_list as u32, (kvh * chunks) as u32, nsplit as u32),
            DEC_THREADS,
            smem,
            &args,
        )?;
        if merge {
            return Ok(());
        }
        self.combine(d, list, n_list, nsplit, po, pm)
    }

    /// Partial results of `nsplit` splits for every row and head (none for one split),
    /// and the kernel arguments addressing them (the output buffer when there are none).
    #[allow(clippy::type_complexity)]
    fn partials(
        &self,
        d: &Decode<'_>,
        nsplit: usize,
    ) -> Result<(Option<(DeviceBuffer<f32>, DeviceBuffer<f32>)>, Arg, Arg), KernelError> {
        if nsplit <= 1 {
            return Ok((None, d.out, d.out));
        }
        let rows = d.step.rows;
        let o = self.scratch::<f32>(rows * d.nh * nsplit * d.hd)?;
        let ml = self.scratch::<f32>(rows * d.nh * nsplit * 2)?;
        let (po, pm) = (p(&o), p(&ml));
        Ok((Some((o, ml)), po, pm))
    }

    /// Merges the splits of the listed rows (`attn_combine`), if there are several.
    fn combine(
        &self,
        d: &Decode<'_>,
        list: usize,
        n_list: usize,
        nsplit: usize,
        po: Arg,
        pm: Arg,
    ) -> Result<(), KernelError> {
        if nsplit <= 1 {
            return Ok(());
        }
        // Shared memory: the split weights and weighted sums, then the partial sums of
        // every column. The block size changes no bit of the result, so few splits
        // (short contexts) take a small block.
        let smem = ((2 * COMBINE_MAX_SPLITS + COMBINE_GROUPS * d.hd) * 4) as u32;
        let threads = if nsplit > 64 { COMBINE_THREADS } else { 256 };
        self.launch(
            &self.k.attn_combine,
            (n_list as u32, d.nh as u32, 1),
            threads,
            smem,
            &[
                Arg::U64(d.step.at(list)),
                po,
                pm,
                d.out,
                Arg::I32(to_i32("attention", d.nh)?),
                Arg::I32(to_i32("attention", d.hd)?),
                Arg::I32(nsplit as i32),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every context of a class launches the same split grids in both decode kernels,
    /// with the keys per split its own context would get (at every split length the
    /// settings accept); a sequence changes class only when its context doubles.
    #[test]
    fn contexts_of_one_class_split_alike() {
        let mut classes = std::collections::BTreeSet::new();
        for ctx in 1..=CLASSED_CTX {
            let class = ctx_class(ctx).expect("within the classed contexts");
            assert!(
                class >= ctx && class < 2 * ctx.max(DEC_SPLIT_KEYS),
                "context {ctx}"
            );
            let grid = grid_ctx(ctx);
            assert_eq!(grid, class);
            for keys in [DEC_SPLIT_KEYS, 128, 256, 512, 4096] {
                assert_eq!(
                    fixed_splits(grid, keys).1,
                    fixed_splits(ctx, keys).1,
                    "context {ctx}, {keys} keys a split: keys per split"
                );
            }
            classes.insert(class);
        }
        assert_eq!(classes.len(), 11, "{classes:?}");
        assert_eq!(ctx_class(CLASSED_CTX + 1), None);
        assert_eq!(grid_ctx(CLASSED_CTX + 1), CLASSED_CTX + 1);
        for ctx in [1, 63, 64, 65, 1000, CLASSED_CTX] {
            let limit = ctx_class_limit(ctx);
            assert!(limit >= ctx && ctx_class(limit) == ctx_class(ctx), "{ctx}");
            assert_ne!(ctx_class(limit + 1), ctx_class(ctx), "{ctx}");
        }
    }
}
