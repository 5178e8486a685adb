//! CUDA graphs: work queued on a [`Gpu`]'s stream recorded once and replayed, and what
//! replaying a forward step takes to be safe.
//!
//! A recorded step replays the same kernels with the same arguments on the same device
//! addresses. So a step may replay a recording only when:
//! - it has the recording's [`StepShape`] (rows, sequences, lists, context classes) under
//!   the same settings ([`Gpu::settings_generation`]): then every launch has the same
//!   grid and scalar arguments;
//! - its metadata is copied over the recording's own ([`Gpu::refresh_step`]): the block
//!   tables come last in it, so every array sits at the same offset;
//! - its indices pass the bounds the launchers checked while recording
//!   ([`StepLimits`]), which they cannot check on a replay;
//! - the scratch buffers of the recording are nobody else's: they come from a pool of
//!   the recording's own ([`ScratchPool`]), filled by a warm-up run of the same step
//!   before the capture (nothing may be allocated while a graph is captured).
//!
//! Recording is per thread: the thread that records launches onto a stream of its own
//! while it captures, and takes scratch from the recording's pool, while other threads
//! (another model on the same GPU) go on using the GPU's stream and shared pool. Replays
//! run on the GPU's stream, in order with everything else.

use std::cell::RefCell;
use std::fmt;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaStream;

use crate::buffer::Pool;
use crate::error::KernelError;
use crate::gpu::{DeviceBuffer, Gpu, Lane, LaneHandles};
use crate::ops::{ctx_class, ctx_class_limit, GEMV_MAX_ROWS};
use crate::step::DeviceStep;

/// Work recorded by [`Gpu::capture`] or [`Gpu::record`], replayed on the GPU's stream.
pub struct CapturedGraph {
    graph: Mutex<SendGraph>,
    /// The GPU's stream (the graph was captured on another).
    stream: Arc<CudaStream>,
}

/// cudarc's graph holds raw driver handles, so it is neither `Send` nor `Sync`. CUDA lets
/// a graph be used from any thread as long as the calls on it are serialized: every use
/// goes through [`CapturedGraph`]'s mutex.
struct SendGraph(cudarc::driver::CudaGraph);

// SAFETY: see `SendGraph`; the handles are only used under the mutex, after binding the
// graph's context to the calling thread.
unsafe impl Send for SendGraph {}

impl fmt::Debug for CapturedGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CapturedGraph").finish_non_exhaustive()
    }
}

impl CapturedGraph {
    /// Queues one replay on the GPU's stream.
    pub fn replay(&self) -> Result<(), KernelError> {
        let graph = self.graph.lock().map_err(|_| KernelError::Device {
            op: "graph launch",
            message: "graph lock poisoned".into(),
        })?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| KernelError::driver("bind context", e))?;
        // SAFETY: the executable graph is live (owned by `graph`, used under its lock)
        // and belongs to this stream's context.
        unsafe {
            cudarc::driver::result::graph::launch(graph.0.cu_graph_exec(), self.stream.cu_stream())
        }
        .map_err(|e| KernelError::driver("graph launch", e))
    }
}

/// What decides the launches of a forward step's kernels, apart from the settings: steps
/// of equal shape may share a recording.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StepShape {
    rows: usize,
    seqs: usize,
    half_dim: usize,
    block_size: usize,
    logit_rows: usize,
    small_rows: usize,
    short_rows: usize,
    long_rows: usize,
    /// The context class (the power of two a launch is sized for) of the longest
    /// context overall, of the small-chunk rows, and of the rows each decode attention
    /// kernel takes.
    ctx: [usize; 4],
}

impl DeviceStep {
    /// The step's shape, or `None` for a step that is never recorded: one with
    /// prefill-sized chunks or more rows than the GEMVs take (those launch cuBLAS and
    /// are long enough not to gain), or a context longer than 64k keys.
    pub fn shape(&self) -> Option<StepShape> {
        if self.n_tiles > 0 || self.rows > GEMV_MAX_ROWS {
            return None;
        }
        Some(StepShape {
            rows: self.rows,
            seqs: self.n_seqs,
            half_dim: self.half_dim,
            block_size: self.block_size,
            logit_rows: self.n_logit_rows,
            small_rows: self.n_small_rows,
            short_rows: self.n_short_rows,
            long_rows: self.n_long_rows,
            ctx: [
                ctx_class(self.max_ctx)?,
                ctx_class(self.max_ctx_small)?,
                ctx_class(self.max_ctx_short)?,
                ctx_class(self.max_ctx_long)?,
            ],
        })
    }

    /// Checks the step's indices against the bounds a recording's launchers checked.
    pub fn check_limits(&self, limits: &StepLimits) -> Result<(), KernelError> {
        let over = |what: &str, value: u32, limit: Option<u32>| match limit {
            Some(l) if value >= l => Err(KernelError::invalid(
                "replay step",
                format!("{what} {value} outside the {l} the recording was checked for"),
            )),
            _ => Ok(()),
        };
        over("token id", self.max_token, limits.tokens)?;
        over("KV slot", self.max_slot, limits.slots)?;
        over("KV block", self.max_block, limits.blocks)
    }
}

/// The exclusive bounds the launchers checked a recorded step's indices against (the
/// smallest of each where several launches checked one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepLimits {
    tokens: Option<u32>,
    slots: Option<u32>,
    blocks: Option<u32>,
}

/// An index bound a launcher checks (see [`StepLimits`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Bound {
    Tokens,
    Slots,
    Blocks,
}

/// Scratch buffers of one recorded step (see the module docs): filled by its warm-up
/// run, used by its capture, then held for as long as its graph lives.
#[derive(Clone)]
pub struct ScratchPool(Arc<Pool>);

impl fmt::Debug for ScratchPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScratchPool").finish_non_exhaustive()
    }
}

impl ScratchPool {
    pub(crate) fn pool(&self) -> Arc<Pool> {
        Arc::clone(&self.0)
    }
}

impl Default for ScratchPool {
    fn default() -> Self {
        ScratchPool(Arc::new(Pool::unbounded()))
    }
}

/// Where a recording reads its input activations ([`Gpu::recording_input`]).
pub struct InputSlot {
    ptr: u64,
    len: usize,
    /// Keeps the buffer alive if the recorded pass gave it back to the pool.
    _pool: ScratchPool,
}

impl fmt::Debug for InputSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InputSlot")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// What this thread is recording, on which GPU.
struct Recorder {
    /// The GPU's address (its identity while it lives).
    gpu: usize,
    /// Scratch comes from here instead of the GPU's pool; with `strict`, a buffer it
    /// lacks is an error instead of an allocation.
    pool: Option<(Arc<Pool>, bool)>,
    /// The stream being captured, while capturing.
    stream: Option<cudarc::driver::sys::CUstream>,
    /// The recording's second stream for forked work ([`Gpu::fork`]), made at its first
    /// fork and dropped after the capture ends.
    lane: Option<Lane>,
    limits: StepLimits,
}

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

fn with_recorder<R>(gpu: &Gpu, f: impl FnOnce(&mut Recorder) -> R) -> Option<R> {
    RECORDER.with(|r| {
        r.borrow_mut()
            .as_mut()
            .filter(|rec| rec.gpu == gpu as *const Gpu as usize)
            .map(f)
    })
}

/// The pool this thread's scratch comes from on `gpu` while it records, and whether
/// a miss is an error.
pub(crate) fn recording_pool(gpu: &Gpu) -> Option<(Arc<Pool>, bool)> {
    with_recorder(gpu, |r| r.pool.clone()).flatten()
}

/// Whether this thread is capturing a graph on `gpu`.
pub(crate) fn capturing(gpu: &Gpu) -> bool {
    capture_stream(gpu).is_some()
}

/// The stream this thread captures on `gpu`, if it does.
pub(crate) fn capture_stream(gpu: &Gpu) -> Option<cudarc::driver::sys::CUstream> {
    with_recorder(gpu, |r| r.stream).flatten()
}

/// The lane of the graph this thread captures on `gpu` (made by `make` at the first
/// fork), as raw handles (stream, fork event, join event); `None` when it captures none.
pub(crate) fn recording_lane(
    gpu: &Gpu,
    make: impl FnOnce() -> Result<Lane, KernelError>,
) -> Option<Result<LaneHandles, KernelError>> {
    with_recorder(gpu, |r| {
        r.stream?;
        if r.lane.is_none() {
            match make() {
                Ok(lane) => r.lane = Some(lane),
                Err(e) => return Some(Err(e)),
            }
        }
        r.lane.as_ref().map(|l| Ok(l.handles()))
    })
    .flatten()
}

/// Sets this thread's recorder for the duration of `f` (they do not nest).
fn recording<R>(
    gpu: &Gpu,
    pool: Option<(Arc<Pool>, bool)>,
    f: impl FnOnce() -> R,
) -> (R, StepLimits) {
    RECORDER.with(|r| {
        *r.borrow_mut() = Some(Recorder {
            gpu: gpu as *const Gpu as usize,
            pool,
            stream: None,
            lane: None,
            limits: StepLimits::default(),
        })
    });
    // Cleared even if `f` panics, so that the thread's later scratch is its own.
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            RECORDER.with(|r| r.borrow_mut().take());
        }
    }
    let _clear = Clear;
    let out = f();
    let limits = RECORDER
        .with(|r| r.borrow_mut().take())
        .map(|r| r.limits)
        .unwrap_or_default();
    (out, limits)
}

impl Gpu {
    /// Records what `f` queues on this thread as one CUDA graph instead of running it
    /// (nothing runs until a replay). The graph replays the same kernels on the same
    /// device addresses, so every buffer `f` uses must be left alone by other work
    /// while the graph is replayed. `f` takes its scratch from the shared pool and may
    /// allocate nothing, so run it once uncaptured first; that holds for a benchmark
    /// that replays one step's layers and does nothing else. Steps are recorded with
    /// [`Gpu::record`].
    pub fn capture<R, E: From<KernelError>>(
        &self,
        f: impl FnOnce() -> Result<R, E>,
    ) -> Result<(R, CapturedGraph), E> {
        recording(self, None, || self.capture_here(f)).0
    }

    /// Runs `f` (which queues a step) as usual, its scratch buffers taken from and
    /// given back to `pool`: the warm-up before [`Gpu::record`].
    pub fn warm_up<R>(&self, pool: &ScratchPool, f: impl FnOnce() -> R) -> R {
        recording(self, Some((Arc::clone(&pool.0), false)), f).0
    }

    /// Records what `f` queues on this thread as one CUDA graph (see
    /// [`Gpu::capture`]), its scratch buffers taken from `pool` (warmed up by the same
    /// work: a buffer it lacks is an error). Returns with the graph the bounds `f`'s
    /// launchers checked step indices against, which a replay must check again.
    pub fn record<R, E: From<KernelError>>(
        &self,
        pool: &ScratchPool,
        f: impl FnOnce() -> Result<R, E>,
    ) -> Result<(R, CapturedGraph, StepLimits), E> {
        let (captured, limits) = recording(self, Some((Arc::clone(&pool.0), true)), || {
            self.capture_here(f)
        });
        let (out, graph) = captured?;
        Ok((out, graph, limits))
    }

    /// Captures `f` on a new stream of this thread's (the recorder is set).
    fn capture_here<R, E: From<KernelError>>(
        &self,
        f: impl FnOnce() -> Result<R, E>,
    ) -> Result<(R, CapturedGraph), E> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let side = self
            .ctx
            .new_stream()
            .map_err(|e| KernelError::driver("capture stream", e))?;
        side.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| KernelError::driver("begin capture", e))?;
        with_recorder(self, |r| r.stream = Some(side.cu_stream()));
        let out = f();
        with_recorder(self, |r| r.stream = None);
        // The capture ends whatever `f` returned, so that the stream is left usable.
        let graph = side
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| KernelError::driver("end capture", e));
        let out = out?;
        let graph = graph?.ok_or_else(|| KernelError::Device {
            op: "end capture",
            message: "nothing was captured".into(),
        })?;
        Ok((
            out,
            CapturedGraph {
                graph: Mutex::new(SendGraph(graph)),
                stream: Arc::clone(&self.stream),
            },
        ))
    }

    /// Notes that a launcher checked a step index against `limit` (while recording).
    pub(crate) fn note_limit(&self, bound: Bound, limit: usize) {
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        with_recorder(self, |r| {
            let slot = match bound {
                Bound::Tokens => &mut r.limits.tokens,
                Bound::Slots => &mut r.limits.slots,
                Bound::Blocks => &mut r.limits.blocks,
            };
            *slot = Some(slot.map_or(limit, |s| s.min(limit)));
        });
    }

    /// A copy of `src` in a scratch buffer of `pool`: the input activations a recording
    /// reads (a pipeline shard's hidden state), with the slot through which each
    /// replay's input is copied over it ([`Gpu::refill`]).
    pub fn recording_input(
        &self,
        pool: &ScratchPool,
        src: &DeviceBuffer<f32>,
    ) -> Result<(DeviceBuffer<f32>, InputSlot), KernelError> {
        // A new buffer, not one of the pool's: the capture needs every buffer the
        // warm-up left there (whose input was the caller's, not the pool's).
        let buf = self.scratch_outside(pool, src.len())?;
        self.copy_f32(src, buf.ptr)?;
        let slot = InputSlot {
            ptr: buf.ptr,
            len: buf.len(),
            _pool: pool.clone(),
        };
        Ok((buf, slot))
    }

    /// Queues a copy of `src` into a recording's input slot.
    pub fn refill(&self, slot: &InputSlot, src: &DeviceBuffer<f32>) -> Result<(), KernelError> {
        if src.len() != slot.len {
            return Err(KernelError::invalid(
                "replay step",
                format!(
                    "an input of {} values for a slot of {}",
                    src.len(),
                    slot.len
                ),
            ));
        }
        // The slot's buffer is the recording's: held by the pass's output or back in the
        // recording's pool, which the slot keeps alive.
        self.copy_f32(src, slot.ptr)
    }

    /// A copy of `step` in a buffer of its own (what a recording keeps, and later steps
    /// of its shape are copied over), with room for the block tables of every sequence
    /// at the longest context of the step's class: every step of its shape fits.
    pub fn persistent_step(&self, step: &DeviceStep) -> Result<DeviceStep, KernelError> {
        let tables = step.words - step.off.block_tables;
        let room = step.n_seqs * ctx_class_limit(step.max_ctx).div_ceil(step.block_size.max(1));
        let buf = self.alloc::<u32>(step.off.block_tables + room.max(tables))?;
        self.copy_words(step, &buf)?;
        Ok(DeviceStep {
            buf: Arc::new(buf),
            ..step.clone()
        })
    }

    /// Copies `src`'s metadata over `dst`'s buffer, which a recording addresses; `src`
    /// must have `dst`'s shape and layout.
    pub fn refresh_step(&self, dst: &mut DeviceStep, src: &DeviceStep) -> Result<(), KernelError> {
        if src.shape() != dst.shape() || src.off != dst.off {
            return Err(KernelError::invalid(
                "replay step",
                format!(
                    "a step of shape {:?} over one of shape {:?}",
                    src.shape(),
                    dst.shape()
                ),
            ));
        }
        self.copy_words(src, &dst.buf)?;
        *dst = DeviceStep {
            buf: Arc::clone(&dst.buf),
            ..src.clone()
        };
        Ok(())
    }

    /// Queues a copy of `step`'s words to the start of `dst`.
    fn copy_words(&self, step: &DeviceStep, dst: &DeviceBuffer<u32>) -> Result<(), KernelError> {
        if dst.len() < step.words {
            return Err(KernelError::invalid(
                "copy step",
                format!("{} words into a buffer of {}", step.words, dst.len()),
            ));
        }
        let _ = (step.buf.inner()?, dst.inner()?);
        // SAFETY: both buffers are live (checked above) and hold at least `step.words`
        // u32; the copy is queued on the one stream, after the work that reads `dst`.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst.ptr,
                step.buf.ptr,
                step.words * std::mem::size_of::<u32>(),
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| KernelError::driver("copy step", e))
    }
}
