//! Decode and verify steps replayed as CUDA graphs
//! ([`Backend::run_step`](crate::backend::Backend::run_step)).
//!
//! A decode step of a 7B model is about 170 short kernels; queued one by one, each
//! launch costs the GPU a little time between kernels. A recording of the whole step
//! (embeddings or a pipeline shard's input, to logits or the shard's output) replays them
//! as one graph. Recordings are kept per model (or shard), by step shape
//! ([`kernels::StepShape`]: rows, sequences and context class, which fix every launch),
//! the settings in force, the chunk layout and the input's shape:
//! - the first step of a shape runs as usual, taking its scratch buffers from a pool of
//!   its own (the warm-up);
//! - the second is captured with that pool (nothing may be allocated while capturing),
//!   then replayed;
//! - later ones copy their metadata (and input) over the recording's, check their
//!   indices against the bounds the launchers checked while recording, and replay.
//!
//! A replay's output is copied out of the recording's buffer, so a caller may keep them
//! across later steps. A step whose capture fails runs as usual, and its shape is not
//! tried again.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use falconer_kernels::{CapturedGraph, InputSlot, ScratchPool, StepLimits, StepShape};

use super::{map_err, CudaBackend, CudaData, CudaStep, CudaTensor};
use crate::backend::StepPass;
use crate::error::BackendError;

/// Recordings kept per model. When they are all taken, a new shape takes the place of
/// the least recently used one that has not been used for `IDLE_STEPS` steps (contexts
/// only grow, so a shape of a class the sequences have left goes idle), or else runs as
/// usual: shapes that come and go never evict the ones in use (each recording costs a
/// warm-up step and a capture).
const MAX_RECORDINGS: usize = 64;
const IDLE_STEPS: u64 = 512;

/// How a model's steps ran ([`StepGraphs::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps run as usual to warm a shape up.
    pub warmed: u64,
    /// Shapes recorded.
    pub recorded: u64,
    /// Steps replayed from a recording (the step that recorded a shape included).
    pub replayed: u64,
    /// Captures that failed (the step then ran as usual).
    pub failed: u64,
    /// Steps of no recordable shape (prefill) or with recording off.
    pub direct: u64,
}

/// One model's recorded steps (the CUDA backend's
/// [`Backend::StepGraphs`](crate::backend::Backend::StepGraphs)).
#[derive(Debug, Default)]
pub struct StepGraphs {
    entries: HashMap<Key, Entry>,
    clock: u64,
    stats: GraphStats,
    last_failure: Option<String>,
}

impl StepGraphs {
    pub fn stats(&self) -> GraphStats {
        self.stats
    }

    /// Why the last capture that failed did.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    shape: StepShape,
    settings: u64,
    chunk_rows: Arc<[usize]>,
    logit_groups: Arc<[usize]>,
    /// The input's shape (`None`: the pass embeds).
    input: Option<InputShape>,
}

/// An input tensor's rows, columns and chunk layout.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct InputShape {
    rows: usize,
    cols: usize,
    groups: Option<Arc<[usize]>>,
}

#[derive(Debug)]
struct Entry {
    last_use: u64,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Seen once; the pool holds the scratch buffers of that run.
    Warm(ScratchPool),
    Recorded(Box<Recording>),
    /// Its capture failed: runs as usual.
    Unrecordable,
}

#[derive(Debug)]
struct Recording {
    /// Dropped first: the graph addresses everything below.
    graph: CapturedGraph,
    /// The metadata the graph reads; each replay copies its step's over it.
    step: CudaStep,
    /// Where the graph reads its input, if it has one.
    input: Option<InputSlot>,
    /// The output the graph writes (logits, or a shard's hidden state).
    output: CudaTensor,
    limits: StepLimits,
    _pool: ScratchPool,
}

/// [`Backend::run_step`] on the CUDA backend.
pub(super) fn run_step<E: From<BackendError> + fmt::Display>(
    be: &CudaBackend,
    graphs: &mut StepGraphs,
    step: &CudaStep,
    input: Option<CudaTensor>,
    pass: &mut StepPass<'_, CudaBackend, E>,
) -> Result<CudaTensor, E> {
    let gpu = &be.gpu;
    let shape = step.dev.shape().filter(|_| be.step_graphs());
    let Some(shape) = shape else {
        graphs.stats.direct += 1;
        return pass(step, input);
    };
    let key = Key {
        shape,
        settings: gpu.settings_generation(),
        chunk_rows: Arc::clone(&step.chunk_rows),
        logit_groups: Arc::clone(&step.logit_groups),
        input: input.as_ref().map(|t| InputShape {
            rows: t.rows,
            cols: t.cols,
            groups: t.groups.clone(),
        }),
    };
    graphs.clock += 1;
    let now = graphs.clock;
    let Some(entry) = graphs.entries.get_mut(&key) else {
        return warm_up(be, graphs, key, now, step, input, pass);
    };
    entry.last_use = now;
    match &mut entry.state {
        State::Unrecordable => {
            graphs.stats.direct += 1;
            pass(step, input)
        }
        State::Warm(pool) => {
            let pool = pool.clone();
            match record(be, &pool, step, input.as_ref(), pass) {
                Ok(rec) => {
                    graphs.stats.recorded += 1;
                    graphs.stats.replayed += 1;
                    // The recording's input is already a copy of this step's.
                    drop(input);
                    let out = replay(be, &rec).map_err(E::from);
                    entry.state = State::Recorded(Box::new(rec));
                    out
                }
                Err(e) => {
                    // Queued as usual, a step that fails is at fault, not the capture:
                    // its shape stays warm.
                    let direct = pass(step, input);
                    if direct.is_ok() {
                        graphs.stats.failed += 1;
                        graphs.last_failure = Some(e.to_string());
                        entry.state = State::Unrecordable;
                    }
                    direct
                }
            }
        }
        State::Recorded(rec) => {
            // A step the recording cannot take (indices past the bounds its launchers
            // checked) runs as usual, where the launchers refuse what they must.
            let fits = step.dev.check_limits(&rec.limits).is_ok()
                && gpu.refresh_step(&mut rec.step.dev, &step.dev).is_ok();
            if !fits {
                graphs.stats.direct += 1;
                return pass(step, input);
            }
            if let (Some(slot), Some(x)) = (&rec.input, &input) {
                gpu.refill(slot, x.f32("replay")?).map_err(map_err)?;
            }
            graphs.stats.replayed += 1;
            replay(be, rec).map_err(E::from)
        }
    }
}

/// Runs the first step of a shape with a new recording's own scratch pool, making room
/// for the recording if there is any to make; else runs it as usual.
fn warm_up<E>(
    be: &CudaBackend,
    graphs: &mut StepGraphs,
    key: Key,
    now: u64,
    step: &CudaStep,
    input: Option<CudaTensor>,
    pass: &mut StepPass<'_, CudaBackend, E>,
) -> Result<CudaTensor, E> {
    if graphs.entries.len() >= MAX_RECORDINGS {
        let idle = graphs.entries.iter().map(|(k, e)| (k, e.last_use));
        match evictable(idle, now, IDLE_STEPS) {
            Some(k) => {
                graphs.entries.remove(&k);
            }
            None => {
                graphs.stats.direct += 1;
                return pass(step, input);
            }
        }
    }
    let pool = ScratchPool::default();
    let out = be.gpu.warm_up(&pool, || pass(step, input))?;
    graphs.stats.warmed += 1;
    graphs.entries.insert(
        key,
        Entry {
            last_use: now,
            state: State::Warm(pool),
        },
    );
    Ok(out)
}

/// The least recently used key among those unused for more than `idle` steps before
/// `now`, if any.
fn evictable<'a, K: Clone + 'a>(
    last_uses: impl Iterator<Item = (&'a K, u64)>,
    now: u64,
    idle: u64,
) -> Option<K> {
    last_uses
        .filter(|&(_, used)| now.saturating_sub(used) > idle)
        .min_by_key(|&(_, used)| used)
        .map(|(k, _)| k.clone())
}

/// Captures `pass` over persistent copies of `step` and `input`, with `pool`'s scratch
/// buffers.
fn record<E: From<BackendError>>(
    be: &CudaBackend,
    pool: &ScratchPool,
    step: &CudaStep,
    input: Option<&CudaTensor>,
    pass: &mut StepPass<'_, CudaBackend, E>,
) -> Result<Recording, E> {
    let gpu = &be.gpu;
    let persistent = CudaStep {
        dev: gpu.persistent_step(&step.dev).map_err(map_err)?,
        chunk_rows: Arc::clone(&step.chunk_rows),
        logit_groups: Arc::clone(&step.logit_groups),
    };
    let (input, slot) = match input {
        Some(x) => {
            let (buf, slot) = gpu
                .recording_input(pool, x.f32("record")?)
                .map_err(map_err)?;
            let copy = CudaTensor {
                data: CudaData::F32(buf),
                rows: x.rows,
                cols: x.cols,
                groups: x.groups.clone(),
            };
            (Some(copy), Some(slot))
        }
        None => (None, None),
    };
    let (output, graph, limits) = gpu
        .record(pool, || pass(&persistent, input).map_err(Captured::Pass))
        .map_err(|e| match e {
            Captured::Pass(e) => e,
            Captured::Kernel(k) => E::from(map_err(k)),
        })?;
    Ok(Recording {
        graph,
        step: persistent,
        input: slot,
        output,
        limits,
        _pool: pool.clone(),
    })
}

/// An error of the captured pass, or of the capture itself.
enum Captured<E> {
    Pass(E),
    Kernel(falconer_kernels::KernelError),
}

impl<E> From<falconer_kernels::KernelError> for Captured<E> {
    fn from(e: falconer_kernels::KernelError) -> Self {
        Captured::Kernel(e)
    }
}

/// Queues a replay and a copy of its output.
fn replay(be: &CudaBackend, rec: &Recording) -> Result<CudaTensor, BackendError> {
    rec.graph.replay().map_err(map_err)?;
    let out = rec.output.f32("replay")?;
    let copy = be.gpu.copy_to_scratch(out).map_err(map_err)?;
    Ok(CudaTensor {
        data: CudaData::F32(copy),
        rows: rec.output.rows,
        cols: rec.output.cols,
        groups: rec.output.groups.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::evictable;

    #[test]
    fn only_idle_recordings_make_room_oldest_first() {
        let keys = ["a", "b", "c"];
        let uses = [100u64, 40, 70];
        let entries = || keys.iter().zip(uses);
        // Nothing idle for more than 512 steps: nothing is evicted.
        assert_eq!(evictable(entries(), 200, 512), None);
        // "b" (last used at 40) and "c" (70) are idle at 600; "b" goes first.
        assert_eq!(evictable(entries(), 600, 512), Some("b"));
        // Exactly `idle` steps is not yet idle.
        assert_eq!(evictable(entries(), 552, 512), None);
        assert_eq!(evictable(entries(), 553, 512), Some("b"));
        assert_eq!(evictable(std::iter::empty::<(&&str, u64)>(), 10, 0), None);
    }
}
