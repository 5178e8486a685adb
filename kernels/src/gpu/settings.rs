//! The GPU's launch settings: which kernels a step takes (GEMV kind, paired and fused
//! launches, row-invariant mode, programmatic dependent launch) and their defaults, each
//! switchable from the environment (`FALCONER_*`) and at run time (benchmarks and tests
//! compare them). Changing one bumps [`Gpu::settings_generation`], so that recorded
//! CUDA graphs of the old kernels are not replayed.

use std::sync::atomic::Ordering;

use super::Gpu;

/// Default context from which decode rows take the tensor-core attention kernel: long
/// contexts, where the CUDA-core kernel is bound by its f32 arithmetic (Falcon-7B decode
/// at 128-384 tokens of context on the H200: 229 tokens/s with this default, 222 with the
/// tensor-core kernel at every context).
pub const ATTN_TC_MIN_CTX: usize = 1024;

/// Default of [`Gpu::set_fork_mlp`] (`FALCONER_FORK_MLP=0|1`): on, measured faster on an
/// H100 (205.4 tokens/s decoding the Falcon-7B shape against 195.0, three interleaved
/// runs each; `benches/results/h100_fork.txt`).
pub const FORK_MLP: bool = true;

/// Default of [`Gpu::set_fork_wide`] (`FALCONER_FORK_WIDE=0|1`): on, measured faster on
/// an H100: row-invariant decoding of the Falcon-7B shape at 188.5 tokens/s against
/// 184.2 (three interleaved runs each; `benches/results/h100_198a0ec.txt`), and plain
/// decoding of the shipped separate-norm target at 3859-3900 tokens/s against
/// 3298-3469, its speculative decoding at 4383 tokens/s (k = 3) against 3897-4212
/// (`examples/specbench/results/h100_198a0ec_*.txt`).
pub const FORK_WIDE: bool = true;

/// Default keys per split of the CUDA-core decode attention (the kernel of contexts below
/// [`ATTN_TC_MIN_CTX`]; `FALCONER_ATTN_SPLIT_KEYS`, a multiple of 64 up to 4096): short
/// splits spread a context over more blocks, long ones save the split merge
/// (`attn_combine`) where a context fits one split.
pub const ATTN_SPLIT_KEYS: usize = 64;

/// The keys per split that [`Gpu::set_attn_split_keys`] accepts: multiples of 64 (the
/// tensor-core kernel's 256-key splits must stay a multiple) up to 4096.
pub(crate) fn valid_attn_split_keys(keys: usize) -> bool {
    keys > 0 && keys.is_multiple_of(64) && keys <= 4096
}

/// The most rows a row-invariant `linear` keeps out of cuBLAS (a verify pass over 8
/// drafts plus catch-up tokens).
pub const ROW_INVARIANT_MAX_ROWS: usize = 16;

/// Default blocks per SM of the split-K tensor-core GEMV (`FALCONER_TC_BLOCKS`): on the
/// H200 a verify pass over 5 rows measured 5.02 ms at 8, 5.16 at 16, 5.30 at 6, 5.38 at
/// 12, 5.59 at 4 and about 5.2 at 24 (isolated GEMVs, partly served from L2 when repeated,
/// favoured 3-4 instead).
pub const TC_BLOCKS_PER_SM: usize = 8;

/// How [`Gpu::linear_pair`] runs its two products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairLaunch {
    /// Two launches, as two `linear` calls.
    Off = 0,
    /// One launch of the kernel each product takes alone (for one row outside
    /// row-invariant mode, the CUDA-core GEMV).
    Simt = 1,
    /// One launch; a single row outside row-invariant mode takes the tensor-core
    /// GEMV (other bits than alone, where nothing requires them to match).
    TensorCores = 2,
}

/// Default [`PairLaunch`] (`FALCONER_PAIR=off|simt|tc`).
pub const PAIR_LAUNCH: PairLaunch = PairLaunch::Simt;

/// How many warps share each output feature's row in a one-row CUDA-core GEMV whose
/// rows are longer than its output count (Falcon's residual sum: 4544 outputs over
/// 22720 inputs), each taking a slice of the row. With one warp per pair of outputs
/// such a grid has a few large blocks per SM, and some SMs one block more than others;
/// sharing rows makes smaller blocks. Other rounding than [`GemvSplit::One`], the same
/// for every launch of one setting.
///
/// Why: on the H200 the MLP down projection streamed at 3547 GB/s against 4057 for the
/// up projection (same bytes, 568 blocks of 8 outputs against 2272; `benches/results/
/// h200.txt`). Measured on two H100s, where that gap is absent (2907 against 2924): the
/// fused sum alone 74.0 -> 71.4 us with 4 warps, decode unchanged within the spread
/// (193.7 tokens/s with one warp, 193.2 with 2, 193.8 with 4; 194.8 and 193.0 with
/// [`Gpu::set_gemv_split_all`]; `benches/results/h100_761022e.txt`). So one warp stays
/// the default until an H200 shows a gain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvSplit {
    One = 1,
    Two = 2,
    Four = 4,
}

impl GemvSplit {
    /// The setting of `warps` warps per output (1, 2 or 4).
    pub fn from_warps(warps: u32) -> Option<Self> {
        match warps {
            1 => Some(Self::One),
            2 => Some(Self::Two),
            4 => Some(Self::Four),
            _ => None,
        }
    }

    /// Index of the kernel in the module's per-split tables (0, 1, 2).
    pub(crate) fn index(self) -> usize {
        match self {
            Self::One => 0,
            Self::Two => 1,
            Self::Four => 2,
        }
    }
}

/// Default [`GemvSplit`] (`FALCONER_GEMV_SPLIT=1|2|4`).
pub const GEMV_SPLIT: GemvSplit = GemvSplit::One;

/// The kernels of a few-row (1 to 8) `linear`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvKernel {
    /// Tensor cores for 2 to 8 rows, CUDA cores for one.
    Auto = 0,
    /// CUDA cores, f32 activations (`gemv_bf16_r*`).
    Simt = 1,
    /// Tensor cores, 4 chunks of 32 per warp iteration (`gemv_tc_r*`).
    Tc4 = 2,
}

/// A boolean switch from the environment: `0`, `false`, `off` or `no` turn it off.
pub(super) fn env_flag(name: &str, default: bool) -> bool {
    match std::env::var(name) {
        Ok(v) => !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "off" | "no"
        ),
        Err(_) => default,
    }
}

impl Gpu {
    /// Whether kernels are queued with programmatic dependent launch (on by default on
    /// sm_90 and newer; `FALCONER_PDL=0` turns it off).
    pub fn pdl(&self) -> bool {
        self.pdl.load(Ordering::Relaxed)
    }

    /// Turns programmatic dependent launch on or off (ignored before sm_90).
    pub fn set_pdl(&self, on: bool) {
        self.pdl.store(on && self.cc.0 >= 9, Ordering::Relaxed);
        self.settings_changed();
    }

    /// The kernel a few-row `linear` of `rows` rows takes. By default
    /// ([`GemvKernel::Auto`]) one row takes the CUDA-core kernel, which streams fastest
    /// (measured on the H200), and 2 to 8 rows the tensor-core one, which costs about the
    /// same for 2 rows as for 8; `FALCONER_GEMV=simt` or `tc` forces one.
    pub(crate) fn gemv_kernel(&self, rows: usize) -> GemvKernel {
        match self.gemv_mode.load(Ordering::Relaxed) {
            m if m == GemvKernel::Simt as u8 => GemvKernel::Simt,
            m if m == GemvKernel::Tc4 as u8 => GemvKernel::Tc4,
            _ if rows >= 2 => GemvKernel::Tc4,
            _ => GemvKernel::Simt,
        }
    }

    /// Chooses the few-row `linear` kernel (benchmarks and tests compare them).
    pub fn set_gemv_kernel(&self, kernel: GemvKernel) {
        self.gemv_mode.store(kernel as u8, Ordering::Relaxed);
        self.settings_changed();
    }

    /// Sets how many warps share each output of a one-row CUDA-core GEMV with rows
    /// longer than its output count ([`GemvSplit`]).
    pub fn set_gemv_split(&self, split: GemvSplit) {
        self.gemv_split.store(split as u8, Ordering::Relaxed);
        self.settings_changed();
    }

    pub fn gemv_split(&self) -> GemvSplit {
        GemvSplit::from_warps(u32::from(self.gemv_split.load(Ordering::Relaxed)))
            .unwrap_or(GEMV_SPLIT)
    }

    /// Lets [`GemvSplit`] apply to every one-row CUDA-core GEMV (plain, paired and
    /// fused sum; `FALCONER_GEMV_SPLIT_ALL=1`), not only to those with rows longer than
    /// their output count (the default): smaller blocks also shorten the tail of a
    /// grid of a few waves, where the last blocks run with the GPU part idle.
    pub fn set_gemv_split_all(&self, on: bool) {
        self.gemv_split_all.store(on, Ordering::Relaxed);
        self.settings_changed();
    }

    pub fn gemv_split_all(&self) -> bool {
        self.gemv_split_all.load(Ordering::Relaxed)
    }

    /// The split a one-row CUDA-core GEMV of `n` outputs over `k` inputs takes.
    pub(crate) fn gemv_split_for(&self, n: usize, k: usize) -> GemvSplit {
        if k > n || self.gemv_split_all() {
            self.gemv_split()
        } else {
            GemvSplit::One
        }
    }

    /// Lets [`Gpu::linear_accumulate_sum`] run its two products as one launch where it
    /// can (the default; `FALCONER_FUSE_SUM=0` turns it off), or always as two.
    pub fn set_fuse_sum(&self, on: bool) {
        self.fuse_sum.store(on, Ordering::Relaxed);
        self.settings_changed();
    }

    pub fn fuse_sum(&self) -> bool {
        self.fuse_sum.load(Ordering::Relaxed)
    }

    /// Lets a fused [`Gpu::linear_accumulate_sum`] whose second input was written before
    /// the kernel queued last stream that product first, before its programmatic
    /// dependent launch wait, so that it overlaps that kernel (the attention, for
    /// Falcon's MLP down projection); `FALCONER_SUM_OVERLAP=1`. Off by default: it
    /// measured slower (H100: 180.0 tokens/s against 190.8 decoding the 7B shape, 186.0
    /// against 190.2 with the split merge in the attention kernel). Other rounding than
    /// the plain fused sum (the terms in the other order).
    pub fn set_sum_overlap(&self, on: bool) {
        self.sum_overlap.store(on, Ordering::Relaxed);
        self.settings_changed();
    }

    pub fn sum_overlap(&self) -> bool {
        self.sum_overlap.load(Ordering::Relaxed)
    }

    /// Lets [`Gpu::attention_and_pair`] store a one-row step's queries, keys and values
    /// from the projection's epilogue (`FALCONER_FUSE_ROPE=1`), or always through
    /// `rope_qkv` (the default: it saves a launch per layer, but with it and the
    /// in-kernel split merge on, decode ran 3-6% slower on an H100). Either way the
    /// same bits. A layer that forks its MLP ([`Gpu::set_fork_mlp`]) always stores them
    /// from the projection.
    pub fn set_fuse_rope(&self, on: bool) {
        self.fuse_rope.store(on, Ordering::Relaxed);
        self.settings_changed();
    }

    pub fn fuse_rope(&self) -> bool {
        self.fuse_rope.load(Ordering::Relaxed)
    }

    /// Lets the CUDA-core decode attention merge its key splits in the last block of
    /// each row and head chunk (`FALCONER_FUSE_COMBINE=1`), or always in a separate
    /// `attn_combine` launch (the default; see [`Gpu::set_fuse_rope`] for the
    /// measurement). Other rounding, the same for a row in any step either way.
    pub fn set_fuse_combine(&self, on: bool) {
        self.fuse_combine.store(on, Ordering::Relaxed);
        self.settings_changed();
    }

    pub fn fuse_combine(&self) -> bool {
        self.fuse_combine.load(Ordering::Relaxed)
    }

    /// Lets a one-row parallel-attention layer outside row-invariant mode run its MLP
    /// down projection on a second stream ([`Gpu::fork`]) while the attention runs on
    /// the main stream, then the attention output projection after both (on by default,
    /// [`FORK_MLP`]; `FALCONER_FORK_MLP=0` turns it off): the attention's small kernels
    /// are latency-bound, so a GEMV streaming beside them hides their time. The forked
    /// layer's qkv projection writes the rotary queries and the KV cache itself (as
    /// with [`Gpu::set_fuse_rope`]; the same bits). The two products accumulate in two
    /// launches, MLP first: other rounding than the fused sum.
    pub fn set_fork_mlp(&self, on: bool) {
        self.fork_mlp.store(on, Ordering::Relaxed);
        self.settings_changed();
    }

    pub fn fork_mlp(&self) -> bool {
        self.fork_mlp.load(Ordering::Relaxed)
    }

    /// With [`Gpu::set_fork_mlp`], forks more than one-row steps of shared-norm layers
    /// ([`FORK_WIDE`]): row-invariant steps whose products run as GEMVs (the runtime's
    /// decode and verify steps; their forked products take scratch reserved before the
    /// fork, and add in the unforked order, so the same bits), and layers whose attention
    /// and MLP have norms of their own (the whole MLP beside the attention; the same
    /// bits too).
    pub fn set_fork_wide(&self, on: bool) {
        self.fork_wide.store(on, Ordering::Relaxed);
        self.settings_changed();
    }

    pub fn fork_wide(&self) -> bool {
        self.fork_wide.load(Ordering::Relaxed)
    }

    /// Lets the decode attention kernels (tensor-core, and CUDA-core at head sizes 64
    /// and 128) start loading a row's keys and values before their PDL wait, all but
    /// those of the row's own step, which the kernel before them writes
    /// (`FALCONER_EARLY_KV=0` turns it off: every key after the wait, as before). The
    /// kernels before that one are complete by then, since every kernel lets its
    /// successor start only after its own wait. The same bits either way.
    pub fn set_early_kv(&self, on: bool) {
        self.early_kv.store(on, Ordering::Relaxed);
        self.settings_changed();
    }

    pub fn early_kv(&self) -> bool {
        self.early_kv.load(Ordering::Relaxed)
    }

    /// How many times [`Gpu::attention_and_pair`] has queued its fused kernel (a
    /// replayed recording adds none): tests check that the path they compare ran.
    pub fn fused_rope_launches(&self) -> u64 {
        self.fused_rope_launches.load(Ordering::Relaxed)
    }

    pub(crate) fn count_fused_rope_launch(&self) {
        self.fused_rope_launches.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times [`Gpu::linear_accumulate_sum`] has queued the overlapped fused sum
    /// (`gemv_cat_late_bf16_r1`; a replayed recording adds none).
    pub fn late_sum_launches(&self) -> u64 {
        self.late_sum_launches.load(Ordering::Relaxed)
    }

    pub(crate) fn count_late_sum_launch(&self) {
        self.late_sum_launches.fetch_add(1, Ordering::Relaxed);
    }

    /// Chooses how [`Gpu::linear_pair`] runs (benchmarks compare them).
    pub fn set_pair_launch(&self, mode: PairLaunch) {
        self.pair_launch.store(mode as u8, Ordering::Relaxed);
        self.settings_changed();
    }

    pub fn pair_launch(&self) -> PairLaunch {
        match self.pair_launch.load(Ordering::Relaxed) {
            m if m == PairLaunch::Off as u8 => PairLaunch::Off,
            m if m == PairLaunch::TensorCores as u8 => PairLaunch::TensorCores,
            _ => PairLaunch::Simt,
        }
    }

    /// Decode rows whose context reaches `min_ctx` take the tensor-core decode attention
    /// (head dim 64 or 128, at least 16 query heads per kv head); shorter ones the f32
    /// CUDA-core kernel. Default [`ATTN_TC_MIN_CTX`]; tests lower it to cover the kernel.
    pub fn set_attn_tc_min_ctx(&self, min_ctx: usize) {
        self.attn_tc_min_ctx.store(min_ctx, Ordering::Relaxed);
        self.settings_changed();
    }

    /// Keys per split of the CUDA-core decode attention ([`ATTN_SPLIT_KEYS`]): fixed for
    /// every step of a setting, so that a row gets the same bits in a verify pass as in
    /// a one-token step. Refuses other lengths than multiples of 64 up to 4096.
    pub fn set_attn_split_keys(&self, keys: usize) -> Result<(), crate::error::KernelError> {
        if !valid_attn_split_keys(keys) {
            return Err(crate::error::KernelError::invalid(
                "attention",
                format!("{keys} keys per split (a multiple of 64 up to 4096)"),
            ));
        }
        self.attn_split_keys.store(keys, Ordering::Relaxed);
        self.settings_changed();
        Ok(())
    }

    pub fn attn_split_keys(&self) -> usize {
        self.attn_split_keys.load(Ordering::Relaxed)
    }

    /// Blocks per SM the split-K tensor-core GEMV aims for: more splits start more loads
    /// at once, fewer cost less in partial sums. Default [`TC_BLOCKS_PER_SM`].
    pub fn set_tc_blocks_per_sm(&self, blocks: usize) {
        self.tc_blocks_per_sm
            .store(blocks.max(1), Ordering::Relaxed);
        self.settings_changed();
    }

    /// Row-invariant products: every `linear` of up to [`ROW_INVARIANT_MAX_ROWS`] rows
    /// takes kernels whose result for a row does not depend on the other rows (the
    /// tensor-core GEMV, hi and lo parts in separate mmas, in groups of up to 8; never
    /// cuBLAS), so that a verify pass gives each row exactly what a one-token step
    /// gives it and greedy speculation reproduces plain greedy decoding bit for bit.
    /// A larger product whose rows come in sequence chunks (`groups`) computes each
    /// chunk as it would be computed alone, so batching sessions changes no bit either.
    /// The runtime turns it on; a single-row step is then slower than with the CUDA-core
    /// GEMV (see the benchmark). Off by default for direct engine use, or
    /// `FALCONER_ROW_INVARIANT=1`.
    pub fn set_row_invariant(&self, on: bool) {
        self.row_invariant.store(on, Ordering::Relaxed);
        self.settings_changed();
    }

    pub fn row_invariant(&self) -> bool {
        self.row_invariant.load(Ordering::Relaxed)
    }

    fn settings_changed(&self) {
        self.settings.fetch_add(1, Ordering::Relaxed);
    }

    /// Changes with every setting that changes which kernels a step launches.
    pub fn settings_generation(&self) -> u64 {
        self.settings.load(Ordering::Relaxed)
    }

    pub fn tc_blocks_per_sm(&self) -> usize {
        self.tc_blocks_per_sm.load(Ordering::Relaxed)
    }

    pub(crate) fn attn_tc_min_ctx(&self) -> usize {
        self.attn_tc_min_ctx.load(Ordering::Relaxed)
    }
}
