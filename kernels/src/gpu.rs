//! One GPU: its context and stream, its loaded kernel module (`module`), a cuBLAS
//! handle, allocation and copies of device buffers (`buffer`), the raw launch plumbing
//! the typed launchers in `ops` build on, (`fork`) a second stream for work that can run
//! beside the next kernels, and (`settings`) the switches that choose which kernels a
//! step launches.
//!
//! Everything runs on one non-default stream in issue order, so no buffer needs events:
//! cudarc's per-buffer event tracking is switched off before the first allocation (it
//! would cost two events per buffer and an event wait per kernel argument), and frees
//! are stream-ordered (`cuMemFreeAsync`), so dropping a buffer that a queued kernel still
//! reads is safe.
//!
//! The ops' outputs and temporaries come from a host-side pool of freed buffers (by type
//! and length): a decode step of a 32-layer model makes hundreds of them, and an
//! allocation plus a free per buffer were most of the host's time per step. Reuse is safe
//! for the same reason as stream-ordered frees: a buffer is only handed out again after
//! its last use was queued on the one stream, so the new writer runs after the old readers.
//! The one exception, work forked onto a second stream (`fork`), is joined back before
//! the buffers it uses are let go.

use std::ffi::c_void;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUmemPool_attribute, CUresult};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, PinnedHostSlice,
};
use cudarc::nvrtc::Ptx;

use crate::buffer::{released, Pool};
pub use crate::buffer::{DeviceBuffer, Elem};
use crate::error::KernelError;
use crate::module::{ptx_for, Kernels};
use settings::env_flag;
pub use settings::{
    GemvKernel, GemvSplit, PairLaunch, ATTN_SPLIT_KEYS, ATTN_TC_MIN_CTX, FORK_MLP, FORK_WIDE,
    GEMV_SPLIT, PAIR_LAUNCH, ROW_INVARIANT_MAX_ROWS, TC_BLOCKS_PER_SM,
};

mod fork;
mod settings;

pub use fork::Forked;
pub(crate) use fork::{Lane, LaneHandles, LaneReserve};

/// A kernel argument: device pointers and sizes travel as 64-bit words, the rest as
/// 32-bit ints and floats, matching the kernels' parameter lists.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    U64(u64),
    I32(i32),
    F32(f32),
}

/// One GPU with its stream, kernels and cuBLAS handle. Cheap operations are queued on
/// the stream; only downloads and [`Gpu::synchronize`] wait.
pub struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// cuBLAS handles are not safe for concurrent use.
    pub(crate) blas: Mutex<CudaBlas>,
    pub(crate) k: Kernels,
    pool: Arc<Pool>,
    /// Bumped by every setter that changes which kernels a step launches, so that a
    /// recorded step is never replayed under other settings.
    settings: AtomicU64,
    /// Launch with programmatic dependent launch (sm_90+; see `common.cuh`).
    pdl: AtomicBool,
    /// Few-row `linear` kernel ([`GemvKernel`] as a number).
    gemv_mode: AtomicU8,
    /// [`PairLaunch`] as a number.
    pair_launch: AtomicU8,
    /// [`GemvSplit`] as a number (warps per output).
    gemv_split: AtomicU8,
    /// Whether the split applies to every one-row CUDA-core GEMV.
    gemv_split_all: AtomicBool,
    /// Whether [`Gpu::linear_accumulate_sum`] may run its two products as one launch.
    fuse_sum: AtomicBool,
    /// Whether a fused sum whose second input is ready early streams that product
    /// before waiting for the kernel before it.
    sum_overlap: AtomicBool,
    /// Whether a one-row step's qkv projection may apply rotary and write the KV cache
    /// itself ([`Gpu::attention_and_pair`]).
    fuse_rope: AtomicBool,
    /// Whether the CUDA-core decode attention merges its own key splits.
    fuse_combine: AtomicBool,
    /// Whether the decode attention kernels load the keys of earlier steps before their
    /// PDL wait.
    early_kv: AtomicBool,
    /// Launches of the fused qkv-rotary projection queued so far (replays add none).
    fused_rope_launches: AtomicU64,
    /// Launches of the overlapped fused sum queued so far (replays add none).
    late_sum_launches: AtomicU64,
    /// Whether a one-row parallel-attention layer runs its MLP down projection on a
    /// second stream beside the attention.
    fork_mlp: AtomicBool,
    /// Whether row-invariant steps and separate-norm layers fork too.
    fork_wide: AtomicBool,
    /// The second stream that work outside a recording forks onto, made at the first
    /// fork.
    lane: Mutex<Option<fork::Lane>>,
    /// Forks queued so far (replays add none).
    forks: AtomicU64,
    /// Decode rows of at least this context take the tensor-core decode attention (when
    /// the geometry allows).
    attn_tc_min_ctx: AtomicUsize,
    /// Keys per split of the CUDA-core decode attention.
    attn_split_keys: AtomicUsize,
    /// Blocks per SM the split-K tensor-core GEMV aims for.
    tc_blocks_per_sm: AtomicUsize,
    /// Few-row products give each row the same bits in any row count (see
    /// [`Gpu::set_row_invariant`]).
    row_invariant: AtomicBool,
    /// Page-locked (cached) host memory that f32 downloads go through: to a pageable
    /// destination the driver stages the copy itself, several times slower for the
    /// logits of a verify pass (1.3 MB at Falcon-7B's vocabulary). Only ever grows.
    staging: Mutex<Option<PinnedHostSlice<f32>>>,
    /// Zeroed arrival counters of the split-K tensor-core GEMV (one per 16-feature
    /// tile; each launch leaves them zeroed again), the last the one in use. Only ever
    /// grows, and outgrown buffers are kept: recorded steps still address them.
    gemv_counters: Mutex<Vec<DeviceBuffer<u32>>>,
    /// The same for forked work (on the lane), reserved before each fork.
    lane_counters: Mutex<Vec<DeviceBuffer<u32>>>,
    name: String,
    cc: (i32, i32),
    sm_count: u32,
    total_mem: usize,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.cc)
            .field("sm_count", &self.sm_count)
            .finish()
    }
}

fn lock_counters(
    counters: &Mutex<Vec<DeviceBuffer<u32>>>,
) -> Result<std::sync::MutexGuard<'_, Vec<DeviceBuffer<u32>>>, KernelError> {
    counters.lock().map_err(|_| KernelError::Device {
        op: "gemv",
        message: "counter lock poisoned".into(),
    })
}

/// The address of the last of `counters` if it holds at least `tiles`.
fn last_holding(counters: &[DeviceBuffer<u32>], tiles: usize) -> Option<u64> {
    counters.last().filter(|b| b.len() >= tiles).map(|b| b.ptr)
}

fn unavailable(reason: impl Into<String>) -> KernelError {
    KernelError::Unavailable(reason.into())
}

impl Gpu {
    /// Opens device `ordinal`: checks that the CUDA driver, NVRTC and cuBLAS libraries
    /// can be loaded (cudarc panics on a missing library, so this comes first), creates
    /// a context and stream, and compiles the kernels for the device's architecture.
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        // SAFETY: these only try to dlopen the libraries.
        unsafe {
            if !cudarc::driver::sys::is_culib_present() {
                return Err(unavailable(
                    "the CUDA driver library (libcuda) is not installed",
                ));
            }
            if !cudarc::nvrtc::sys::is_culib_present() {
                return Err(unavailable("the NVRTC library (libnvrtc) is not installed"));
            }
            if !cudarc::cublas::sys::is_culib_present() {
                return Err(unavailable(
                    "the cuBLAS library (libcublas) is not installed",
                ));
            }
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| unavailable(format!("cannot open CUDA device {ordinal}: {e:?}")))?;
        let attr = |a| {
            ctx.attribute(a)
                .map_err(|e| KernelError::driver("device attribute", e))
        };
        let sm_count = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| KernelError::driver("compute capability", e))?;
        if cc.0 < 8 {
            return Err(unavailable(format!(
                "device {ordinal} has compute capability {}.{}; falconer's kernels need 8.0 \
                 (bf16 tensor cores) or newer",
                cc.0, cc.1
            )));
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let total_mem = ctx.total_mem().unwrap_or(0);
        // SAFETY: no buffer of this context exists yet in this Gpu, and every buffer it
        // makes is used on its single stream only (see the module docs).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| KernelError::driver("create stream", e))?;
        keep_pool_memory(&ctx);
        let ptx = ptx_for(&format!("compute_{}{}", cc.0, cc.1))?;
        let module = ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(|e| KernelError::driver("load module", e))?;
        let k = Kernels::load(&module)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| KernelError::Device {
            op: "cublas init",
            message: format!("{e:?}"),
        })?;
        Ok(Gpu {
            ctx,
            stream,
            blas: Mutex::new(blas),
            k,
            pool: Arc::new(Pool::default()),
            settings: AtomicU64::new(0),
            pdl: AtomicBool::new(cc.0 >= 9 && env_flag("FALCONER_PDL", true)),
            gemv_mode: AtomicU8::new(match std::env::var("FALCONER_GEMV").as_deref() {
                Ok("tc") => GemvKernel::Tc4,
                Ok("simt") => GemvKernel::Simt,
                _ => GemvKernel::Auto,
            } as u8),
            pair_launch: AtomicU8::new(match std::env::var("FALCONER_PAIR").as_deref() {
                Ok("off") => PairLaunch::Off,
                Ok("simt") => PairLaunch::Simt,
                Ok("tc") => PairLaunch::TensorCores,
                _ => PAIR_LAUNCH,
            } as u8),
            gemv_split: AtomicU8::new(
                std::env::var("FALCONER_GEMV_SPLIT")
                    .ok()
                    .and_then(|v| GemvSplit::from_warps(v.trim().parse().ok()?))
                    .unwrap_or(GEMV_SPLIT) as u8,
            ),
            gemv_split_all: AtomicBool::new(env_flag("FALCONER_GEMV_SPLIT_ALL", false)),
            fuse_sum: AtomicBool::new(env_flag("FALCONER_FUSE_SUM", true)),
            sum_overlap: AtomicBool::new(env_flag("FALCONER_SUM_OVERLAP", false)),
            fuse_rope: AtomicBool::new(env_flag("FALCONER_FUSE_ROPE", false)),
            fused_rope_launches: AtomicU64::new(0),
            late_sum_launches: AtomicU64::new(0),
            fork_mlp: AtomicBool::new(env_flag("FALCONER_FORK_MLP", FORK_MLP)),
            fork_wide: AtomicBool::new(env_flag("FALCONER_FORK_WIDE", FORK_WIDE)),
            lane: Mutex::new(None),
            forks: AtomicU64::new(0),
            fuse_combine: AtomicBool::new(env_flag("FALCONER_FUSE_COMBINE", false)),
            early_kv: AtomicBool::new(env_flag("FALCONER_EARLY_KV", true)),
            gemv_counters: Mutex::new(Vec::new()),
            lane_counters: Mutex::new(Vec::new()),
            attn_tc_min_ctx: AtomicUsize::new(ATTN_TC_MIN_CTX),
            attn_split_keys: AtomicUsize::new(
                std::env::var("FALCONER_ATTN_SPLIT_KEYS")
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .filter(|&k| settings::valid_attn_split_keys(k))
                    .unwrap_or(ATTN_SPLIT_KEYS),
            ),
            staging: Mutex::new(None),
            row_invariant: AtomicBool::new(env_flag("FALCONER_ROW_INVARIANT", false)),
            tc_blocks_per_sm: AtomicUsize::new(
                std::env::var("FALCONER_TC_BLOCKS")
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .filter(|&b: &usize| b > 0)
                    .unwrap_or(TC_BLOCKS_PER_SM),
            ),
            name,
            cc,
            sm_count: sm_count.max(1) as u32,
            total_mem,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    pub fn device_name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    pub fn total_memory(&self) -> usize {
        self.total_mem
    }

    /// Device address of at least `tiles` zeroed GEMV arrival counters. Forked work
    /// gets the lane's own (reserved before the fork, [`Gpu::fork_with`]): a launch on
    /// each stream at once must not share them.
    pub(crate) fn gemv_counters(&self, tiles: usize) -> Result<u64, KernelError> {
        if fork::lane_stream(self).is_some() {
            return last_holding(&lock_counters(&self.lane_counters)?, tiles).ok_or_else(|| {
                KernelError::invalid(
                    "fork",
                    format!("{tiles} arrival counters in forked work that reserved fewer"),
                )
            });
        }
        self.grow_counters(&self.gemv_counters, tiles)
    }

    /// The last of `counters` if it holds `tiles`, else a new zeroed one that does.
    pub(crate) fn grow_counters(
        &self,
        counters: &Mutex<Vec<DeviceBuffer<u32>>>,
        tiles: usize,
    ) -> Result<u64, KernelError> {
        // Held while a new buffer is made, so that two threads do not both make one.
        let mut c = lock_counters(counters)?;
        if let Some(ptr) = last_holding(&c, tiles) {
            return Ok(ptr);
        }
        let b = self.zeros::<u32>(tiles.max(4096))?;
        let ptr = b.ptr;
        c.push(b);
        Ok(ptr)
    }

    /// Waits for everything queued so far.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(|e| KernelError::driver("synchronize", e))
    }

    /// A buffer of `len` elements with unspecified contents.
    pub fn alloc<T: Elem>(&self, len: usize) -> Result<DeviceBuffer<T>, KernelError> {
        let slice = self.fresh::<T>("alloc", len)?;
        Ok(self.wrap(slice, len, None))
    }

    /// New device memory for `len` elements (at least one), refused while this thread
    /// captures a graph.
    fn fresh<T: Elem>(&self, op: &'static str, len: usize) -> Result<CudaSlice<T>, KernelError> {
        self.not_capturing(op)?;
        // SAFETY: the memory is only ever read by kernels after they or a copy wrote it,
        // or as plain bits (any bit pattern is a valid f32/u32/bf16).
        unsafe { self.stream.alloc::<T>(len.max(1)) }
            .map_err(|e| alloc_error(e, len * std::mem::size_of::<T>()))
    }

    /// Like [`Gpu::alloc`], from (and, when dropped, back to) the pool: for op outputs
    /// and temporaries.
    pub(crate) fn scratch<T: Elem>(&self, len: usize) -> Result<DeviceBuffer<T>, KernelError> {
        // Forked work takes what its fork reserved (a buffer of the main pool would go
        // back to it before the join).
        if fork::lane_stream(self).is_some() {
            let unreserved = || {
                KernelError::invalid(
                    "fork",
                    format!("a scratch buffer of {len} elements that the fork did not reserve"),
                )
            };
            let lane = fork::lane_pool(self).ok_or_else(unreserved)?;
            let slice = lane.take::<T>(len.max(1)).ok_or_else(unreserved)?;
            return Ok(self.wrap(slice, len, Some(lane)));
        }
        let (pool, strict) =
            crate::graph::recording_pool(self).unwrap_or_else(|| (Arc::clone(&self.pool), false));
        let slice = match pool.take::<T>(len.max(1)) {
            Some(s) => s,
            None if strict => {
                return Err(KernelError::invalid(
                    "record step",
                    format!("a scratch buffer of {len} elements the warm-up run did not make"),
                ))
            }
            None => self.fresh::<T>("scratch", len)?,
        };
        Ok(self.wrap(slice, len, Some(pool)))
    }

    /// A new buffer that goes back to `pool` when dropped (a recording's input).
    pub(crate) fn scratch_outside(
        &self,
        pool: &crate::graph::ScratchPool,
        len: usize,
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        let slice = self.fresh::<f32>("scratch", len)?;
        Ok(self.wrap(slice, len, Some(pool.pool())))
    }

    /// Refuses an allocation while a graph is captured: the graph would own it.
    pub(crate) fn not_capturing(&self, op: &'static str) -> Result<(), KernelError> {
        fork::refuse_on_lane(self, op)?;
        if crate::graph::capturing(self) {
            return Err(KernelError::invalid(
                op,
                "allocation while recording a step",
            ));
        }
        Ok(())
    }

    pub fn zeros<T: Elem>(&self, len: usize) -> Result<DeviceBuffer<T>, KernelError> {
        self.not_capturing("zeros")?;
        let slice = self
            .stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| alloc_error(e, len * std::mem::size_of::<T>()))?;
        Ok(self.wrap(slice, len, None))
    }

    pub fn upload<T: Elem>(&self, data: &[T]) -> Result<DeviceBuffer<T>, KernelError> {
        self.not_capturing("upload")?;
        if data.is_empty() {
            return self.zeros(0);
        }
        let slice = self
            .stream
            .clone_htod(data)
            .map_err(|e| alloc_error(e, std::mem::size_of_val(data)))?;
        Ok(self.wrap(slice, data.len(), None))
    }

    /// Copies a buffer to the host, waiting for the work that produces it.
    pub fn download<T: Elem>(&self, buf: &DeviceBuffer<T>) -> Result<Vec<T>, KernelError> {
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = vec![T::default(); buf.len];
        let view = buf.inner()?.slice(0..buf.len);
        self.stream
            .memcpy_dtoh(&view, &mut out)
            .map_err(|e| KernelError::driver("copy to host", e))?;
        self.synchronize()?;
        Ok(out)
    }

    /// A copy on this GPU of an f32 buffer of another GPU (a hidden state from the
    /// pipeline shard before, on another device): waits for the work queued on the
    /// buffer's own GPU, then copies through the host (no peer access needed; a hidden
    /// state is a few rows of a model's width).
    pub fn copy_from_other_gpu(
        &self,
        buf: &DeviceBuffer<f32>,
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        const OP: &str = "copy between GPUs";
        let src = buf.inner()?;
        let mut host = vec![0.0f32; buf.len];
        if buf.len > 0 {
            // Everything queued on that GPU, whichever stream (a replayed recording,
            // forked work), before the copy.
            src.context()
                .synchronize()
                .map_err(|e| KernelError::driver(OP, e))?;
            let (stream, view) = (src.stream(), src.slice(0..buf.len));
            stream
                .memcpy_dtoh(&view, &mut host)
                .map_err(|e| KernelError::driver(OP, e))?;
            stream
                .synchronize()
                .map_err(|e| KernelError::driver(OP, e))?;
        }
        self.upload(&host)
    }

    /// [`Gpu::download`] for f32 through the pinned staging buffer (logits, hidden
    /// states between shards).
    pub fn download_f32(&self, buf: &DeviceBuffer<f32>) -> Result<Vec<f32>, KernelError> {
        let n = buf.len;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut staging = self.staging.lock().map_err(|_| KernelError::Device {
            op: "copy to host",
            message: "staging buffer lock poisoned".into(),
        })?;
        if staging.as_ref().is_none_or(|s| s.len() < n) {
            *staging = None;
            // SAFETY: the contents are only read after the copy below has written them.
            let fresh = unsafe {
                self.ctx
                    .alloc_pinned_with_flags::<f32>(n.next_power_of_two(), 0)
            }
            .map_err(|e| KernelError::driver("pinned host allocation", e))?;
            *staging = Some(fresh);
        }
        let Some(pinned) = staging.as_mut() else {
            return Err(released());
        };
        let host = pinned
            .as_mut_slice()
            .map_err(|e| KernelError::driver("copy to host", e))?;
        let dst = &mut host[..n];
        let _ = buf.inner()?;
        // SAFETY: `dst` is n f32 of page-locked host memory and `buf.ptr` the device
        // address of a live buffer of n f32; the copy is queued after the work that
        // writes it and waited for before `dst` is read.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, buf.ptr, self.stream.cu_stream()) }
            .map_err(|e| KernelError::driver("copy to host", e))?;
        self.synchronize()?;
        Ok(dst.to_vec())
    }

    /// Copies all of `src` to device address `dst`, which the caller guarantees holds
    /// `src.len()` f32 of a live buffer of this GPU (queued on the stream).
    pub(crate) fn copy_f32(&self, src: &DeviceBuffer<f32>, dst: u64) -> Result<(), KernelError> {
        let _ = src.inner()?;
        // SAFETY: `src` is live with `src.len()` f32; the caller vouches for `dst`.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst,
                src.ptr,
                src.num_bytes(),
                self.launch_stream(),
            )
        }
        .map_err(|e| KernelError::driver("copy", e))
    }

    /// A copy of `src` in a scratch buffer (device to device).
    pub fn copy_to_scratch(
        &self,
        src: &DeviceBuffer<f32>,
    ) -> Result<DeviceBuffer<f32>, KernelError> {
        let dst = self.scratch::<f32>(src.len)?;
        if src.len > 0 {
            self.copy_f32(src, dst.ptr)?;
        }
        Ok(dst)
    }

    /// A copy of `src` in a new buffer (device to device).
    pub fn duplicate<T: Elem>(
        &self,
        src: &DeviceBuffer<T>,
    ) -> Result<DeviceBuffer<T>, KernelError> {
        let mut dst = self.alloc::<T>(src.len)?;
        if src.len > 0 {
            self.stream
                .memcpy_dtod(src.inner()?, dst.inner_mut()?)
                .map_err(|e| KernelError::driver("device copy", e))?;
        }
        Ok(dst)
    }

    fn wrap<T: Elem>(
        &self,
        slice: CudaSlice<T>,
        len: usize,
        pool: Option<Arc<Pool>>,
    ) -> DeviceBuffer<T> {
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(&self.stream);
            ptr
        };
        DeviceBuffer {
            slice: Some(slice),
            len,
            ptr,
            pool,
        }
    }

    /// The stream launches go to: the GPU's, the one this thread is capturing a graph
    /// on, or the second stream it queues forked work on ([`Gpu::fork`]).
    pub(crate) fn launch_stream(&self) -> cudarc::driver::sys::CUstream {
        fork::lane_stream(self)
            .or_else(|| crate::graph::capture_stream(self))
            .unwrap_or_else(|| self.stream.cu_stream())
    }

    /// Queues `func` with `args` (validated by the typed launcher that calls this).
    pub(crate) fn launch(
        &self,
        func: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<(), KernelError> {
        self.launch_clustered(func, grid, block, smem, args, 1)
    }

    /// [`Gpu::launch`] in clusters of `cluster` blocks along x (sm_90+; 1 is a plain
    /// launch).
    pub(crate) fn launch_clustered(
        &self,
        func: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
        cluster: u32,
    ) -> Result<(), KernelError> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| KernelError::driver("bind context", e))?;
        let mut vals: Vec<Arg> = args.to_vec();
        let mut ptrs: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|a| match a {
                Arg::U64(v) => v as *mut u64 as *mut c_void,
                Arg::I32(v) => v as *mut i32 as *mut c_void,
                Arg::F32(v) => v as *mut f32 as *mut c_void,
            })
            .collect();
        // SAFETY: every launcher in `ops` passes exactly the parameter list of its
        // kernel, with device pointers of live buffers whose lengths it checked against
        // the sizes the kernel will index; `vals` outlives the call, and cuLaunchKernel
        // copies the argument values before returning.
        // Forked work depends on an event, not on the kernel before it in its stream.
        let pdl = self.pdl() && fork::lane_stream(self).is_none();
        if pdl || cluster > 1 {
            use cudarc::driver::sys::{CUlaunchAttribute, CUlaunchAttributeID};
            // SAFETY: plain-data C structs, valid when zeroed.
            let mut attrs: [CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
            let mut n = 0;
            if pdl {
                attrs[n].id =
                    CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
                attrs[n].value.programmaticStreamSerializationAllowed = 1;
                n += 1;
            }
            if cluster > 1 {
                attrs[n].id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
                attrs[n].value.clusterDim.x = cluster;
                attrs[n].value.clusterDim.y = 1;
                attrs[n].value.clusterDim.z = 1;
                n += 1;
            }
            let cfg = cudarc::driver::sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: smem,
                hStream: self.launch_stream(),
                attrs: attrs.as_mut_ptr(),
                numAttrs: n as u32,
            };
            // SAFETY: as for the plain launch below; the attributes and config outlive
            // the call. Every kernel in the module calls `pdl_wait()` before it
            // touches memory that another kernel writes (before it, only weights and step
            // metadata are read), so none reads or writes such memory before its
            // predecessor completed; a cluster launch's grid is
            // a multiple of the cluster (checked by the driver).
            return unsafe {
                cudarc::driver::sys::cuLaunchKernelEx(
                    &cfg,
                    func.cu_function(),
                    ptrs.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
            .result()
            .map_err(|e| KernelError::driver("kernel launch", e));
        }
        unsafe {
            cudarc::driver::result::launch_kernel(
                func.cu_function(),
                grid,
                (block, 1, 1),
                smem,
                self.launch_stream(),
                &mut ptrs,
            )
        }
        .map_err(|e| KernelError::driver("kernel launch", e))
    }
}

/// Stream-ordered allocations come from the device's default memory pool; by default
/// it hands memory back to the driver at every synchronisation, which makes the next
/// step's allocations slow. Keep it instead (best effort: a failure only costs speed).
fn keep_pool_memory(ctx: &Arc<CudaContext>) {
    if !ctx.has_async_alloc() {
        return;
    }
    // SAFETY: the device handle comes from a live context; the attribute takes a u64.
    unsafe {
        if let Ok(pool) = cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device()) {
            let mut threshold = u64::MAX;
            let _ = cudarc::driver::result::mem_pool::set_attribute(
                pool,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut c_void,
            );
        }
    }
}

fn alloc_error(e: DriverError, requested: usize) -> KernelError {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        KernelError::OutOfMemory { requested }
    } else {
        KernelError::driver("allocate", e)
    }
}
