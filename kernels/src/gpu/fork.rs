//! A second stream (a "lane") for work that the next kernels on the thread's stream do
//! not need: [`Gpu::fork`] queues it there, starting after everything queued so far, and
//! [`Forked::join`] makes the thread's stream wait for it. Falcon's parallel-attention
//! layer uses it for the MLP down projection ([`Gpu::set_fork_mlp`]): a bandwidth-bound
//! GEMV that needs only the up projection, while the attention's chain of small,
//! latency-bound kernels runs beside it on the main stream.
//!
//! Buffers: the GPU's buffers otherwise live on one stream (`gpu.rs`), where a buffer goes
//! back to the pool, or is freed, once its last use is queued. Forked work may use only
//! buffers that its caller keeps alive until it has queued the join, and no kernel on the
//! main stream may write them in between; after the join every later use is ordered
//! after the lane's work, so the one-stream rule holds again. Scratch buffers and GEMV
//! arrival counters that forked work needs (the split-K tensor-core GEMV's) are reserved
//! on the main stream before the fork ([`Gpu::fork_with`]): the scratch goes to a pool of
//! the fork's own, back to the main pool only at the join, and the counters are the
//! lane's own. Forked work allocates nothing.
//!
//! Kernels on the lane launch without programmatic dependent launch: the kernel before
//! one of them in its stream is not what it depends on (the event is). While the thread
//! records a graph, the lane is one of the recording's own, a fresh stream that joins the
//! capture through the fork event, so that the fork and the join become edges of the
//! graph.

use std::cell::RefCell;
use std::sync::Arc;

use cudarc::driver::sys::{CUevent, CUevent_wait_flags, CUstream};
use cudarc::driver::{CudaEvent, CudaStream};

use super::Gpu;
use crate::buffer::Pool;
use crate::error::KernelError;

/// A lane's stream, fork event and join event, as raw driver handles.
pub(crate) type LaneHandles = (CUstream, CUevent, CUevent);

/// A second stream with its fork and join events.
pub(crate) struct Lane {
    stream: Arc<CudaStream>,
    /// Recorded on the main stream at the fork; the lane waits for it.
    start: CudaEvent,
    /// Recorded on the lane after the forked work; the join waits for it.
    done: CudaEvent,
}

impl Lane {
    pub(crate) fn new(gpu: &Gpu) -> Result<Self, KernelError> {
        let stream = gpu
            .ctx
            .new_stream()
            .map_err(|e| KernelError::driver("fork stream", e))?;
        let event = || {
            gpu.ctx
                .new_event(None)
                .map_err(|e| KernelError::driver("fork event", e))
        };
        Ok(Lane {
            stream,
            start: event()?,
            done: event()?,
        })
    }

    pub(crate) fn handles(&self) -> LaneHandles {
        (
            self.stream.cu_stream(),
            self.start.cu_event(),
            self.done.cu_event(),
        )
    }
}

/// The fork this thread queues work for.
struct OnLane {
    /// The GPU's address.
    gpu: usize,
    /// Where this thread's launches go.
    stream: CUstream,
    /// The scratch the fork reserved.
    pool: Option<Arc<Pool>>,
}

thread_local! {
    static ON_LANE: RefCell<Option<OnLane>> = const { RefCell::new(None) };
}

/// What `f` reads of the fork this thread queues work for on `gpu`, while it does.
fn on_lane<R>(gpu: &Gpu, f: impl FnOnce(&OnLane) -> R) -> Option<R> {
    ON_LANE.with(|l| {
        l.borrow()
            .as_ref()
            .filter(|l| l.gpu == gpu as *const Gpu as usize)
            .map(f)
    })
}

/// What forked work may take besides kernels: f32 scratch buffers of these lengths, and
/// this many GEMV arrival counters (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LaneReserve {
    /// Lengths that launches take one at a time: one buffer of each serves them all.
    shared: Vec<usize>,
    /// Lengths held for the whole fork, each a buffer of its own (a held buffer of the
    /// same length as a shared one is still in use when a launch takes the shared one).
    held: Vec<usize>,
    pub(crate) counters: usize,
}

impl LaneReserve {
    /// Nothing: forked work that only launches kernels on its caller's buffers.
    pub(crate) fn none() -> Self {
        Self::default()
    }

    /// A buffer of `len` that forked launches take one at a time (one is enough for all).
    pub(crate) fn add_scratch(&mut self, len: usize) {
        if !self.shared.contains(&len) {
            self.shared.push(len);
        }
    }

    /// A buffer of `len` held beside the others.
    pub(crate) fn hold_scratch(&mut self, len: usize) {
        self.held.push(len);
    }

    /// The lengths of every buffer the fork takes.
    fn scratch_lens(&self) -> impl Iterator<Item = usize> + '_ {
        self.shared.iter().chain(&self.held).copied()
    }
}

/// The scratch pool of the fork this thread queues on `gpu`, while it does.
pub(crate) fn lane_pool(gpu: &Gpu) -> Option<Arc<Pool>> {
    on_lane(gpu, |l| l.pool.clone()).flatten()
}

/// The lane this thread queues forked work on for `gpu`, while it does.
pub(crate) fn lane_stream(gpu: &Gpu) -> Option<CUstream> {
    on_lane(gpu, |l| l.stream)
}

/// An error if this thread is queueing forked work on `gpu`: what `what` would share
/// with the main stream is not safe there (see the module docs).
pub(crate) fn refuse_on_lane(gpu: &Gpu, what: &str) -> Result<(), KernelError> {
    match lane_stream(gpu) {
        Some(_) => Err(KernelError::invalid(
            "fork",
            format!("{what} in forked work (it may only launch kernels)"),
        )),
        None => Ok(()),
    }
}

/// A fork's scratch (a pool of its own) and the pool it came from, where it goes at the
/// join.
type Held = (Arc<Pool>, Arc<Pool>);

/// Work queued by [`Gpu::fork`] and not yet waited for. Dropping it joins too (errors
/// ignored), so that an error between the fork and the join leaves no stream of a
/// capture unjoined.
#[must_use = "the main stream must join the forked work before its buffers are reused"]
#[derive(Debug)]
pub struct Forked<'a> {
    gpu: &'a Gpu,
    /// The lane's `done` event: alive as long as its lane, which outlives this (the
    /// GPU's own lane lives with the GPU, a recording's until the recording ends, after
    /// the work that forked).
    done: CUevent,
    held: Option<Held>,
    joined: bool,
}

impl Forked<'_> {
    /// Makes the thread's stream wait for the forked work: what it queues next runs after
    /// it.
    pub fn join(mut self) -> Result<(), KernelError> {
        self.joined = true;
        self.wait()
    }

    fn wait(&mut self) -> Result<(), KernelError> {
        let waited = self.queue_wait();
        if let Some((lane, origin)) = self.held.take() {
            if waited.is_ok() {
                // Later uses queue after the join, so after the forked work.
                lane.drain_into(&origin);
            } else {
                // Nothing orders them after the forked work: never reused nor freed.
                std::mem::forget(lane);
            }
        }
        waited
    }

    fn queue_wait(&self) -> Result<(), KernelError> {
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(|e| KernelError::driver("bind context", e))?;
        // SAFETY: the event is alive (see `done`) and belongs to this stream's context.
        unsafe {
            cudarc::driver::result::stream::wait_event(
                self.gpu.launch_stream(),
                self.done,
                CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| KernelError::driver("join", e))
    }
}

impl Drop for Forked<'_> {
    fn drop(&mut self) {
        if !self.joined {
            let _ = self.wait();
        }
    }
}

/// Clears `ON_LANE` when dropped (also if the forked work panics).
struct OffLane;

impl Drop for OffLane {
    fn drop(&mut self) {
        ON_LANE.with(|l| *l.borrow_mut() = None);
    }
}

impl Gpu {
    /// Queues what `f` launches on a second stream, after everything this thread queued
    /// so far, and returns at once: what the thread queues next runs beside it until it
    /// joins the returned [`Forked`]. `f` may only launch kernels (no allocation, copy or
    /// cuBLAS call), on buffers that the caller keeps alive and that nothing else
    /// writes until the join (see the module docs). Forks do not nest.
    pub fn fork<R>(
        &self,
        f: impl FnOnce() -> Result<R, KernelError>,
    ) -> Result<(R, Forked<'_>), KernelError> {
        self.fork_with(&LaneReserve::none(), f)
    }

    /// [`Gpu::fork`] for work that takes the scratch buffers and GEMV arrival counters
    /// of `reserve` (taken here, before the fork; `f` asking for others is an error).
    pub(crate) fn fork_with<R>(
        &self,
        reserve: &LaneReserve,
        f: impl FnOnce() -> Result<R, KernelError>,
    ) -> Result<(R, Forked<'_>), KernelError> {
        if lane_stream(self).is_some() {
            return Err(KernelError::invalid("fork", "forks do not nest"));
        }
        let held = self.reserve(reserve)?;
        let main = self.launch_stream();
        // A recording forks onto a lane of its own; other work onto the GPU's, whose
        // lock is held until the forked work is queued, so that two threads' forks do not
        // interleave their events (which would only make them wait longer).
        let mut eager = None;
        let handles = match crate::graph::recording_lane(self, || Lane::new(self)) {
            Some(h) => h?,
            None => {
                let mut guard = self.lane.lock().map_err(|_| KernelError::Device {
                    op: "fork",
                    message: "lane lock poisoned".into(),
                })?;
                let h = match &*guard {
                    Some(lane) => lane.handles(),
                    None => guard.insert(Lane::new(self)?).handles(),
                };
                eager = Some(guard);
                h
            }
        };
        let (lane, start, done) = handles;
        self.ctx
            .bind_to_thread()
            .map_err(|e| KernelError::driver("bind context", e))?;
        // SAFETY: the stream and events are alive (the lane outlives this call) and
        // belong to this GPU's context.
        unsafe {
            cudarc::driver::result::event::record(start, main)
                .and_then(|()| {
                    cudarc::driver::result::stream::wait_event(
                        lane,
                        start,
                        CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                })
                .map_err(|e| KernelError::driver("fork", e))?;
        }
        let out = {
            let on = OnLane {
                gpu: self as *const Gpu as usize,
                stream: lane,
                pool: held.as_ref().map(|(l, _)| Arc::clone(l)),
            };
            ON_LANE.with(|l| *l.borrow_mut() = Some(on));
            let _off = OffLane;
            f()
        };
        // SAFETY: as above.
        let recorded = unsafe { cudarc::driver::result::event::record(done, lane) }
            .map_err(|e| KernelError::driver("fork", e));
        drop(eager);
        let forked = Forked {
            gpu: self,
            done,
            held,
            joined: false,
        };
        // On an error the forked part is joined at once (by the drop).
        recorded?;
        let out = out?;
        self.forks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((out, forked))
    }

    /// Takes `reserve`'s scratch from the pool `Gpu::scratch` takes from (a recording's
    /// or the GPU's) into a pool of the fork's own, returning both, and makes the lane's
    /// counters large enough.
    fn reserve(&self, reserve: &LaneReserve) -> Result<Option<Held>, KernelError> {
        if reserve.counters > 0 {
            self.grow_counters(&self.lane_counters, reserve.counters)?;
        }
        if reserve.scratch_lens().next().is_none() {
            return Ok(None);
        }
        let lane = Arc::new(Pool::unbounded());
        let mut origin = None;
        for len in reserve.scratch_lens() {
            let mut b = self.scratch::<f32>(len)?;
            origin = b.pool.take();
            if let Some(slice) = b.slice.take() {
                lane.put(slice);
            }
        }
        Ok(origin.map(|o| (lane, o)))
    }

    /// How many forks queued their work (refused ones and replayed recordings add
    /// none): tests check that the path they compare ran.
    pub fn forks(&self) -> u64 {
        self.forks.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::LaneReserve;

    #[test]
    fn held_scratch_is_never_shared() {
        // Falcon-7B's forked MLP at one row: the held up activations (18176) have the
        // length of the down projection's four-way split-K partials (4 x 4544).
        let mut r = LaneReserve::none();
        r.add_scratch(4 * 18176);
        r.hold_scratch(18176);
        r.add_scratch(4 * 4544);
        r.add_scratch(4 * 18176);
        let mut lens: Vec<usize> = r.scratch_lens().collect();
        lens.sort_unstable();
        assert_eq!(lens, vec![18176, 18176, 4 * 18176]);
    }
}
