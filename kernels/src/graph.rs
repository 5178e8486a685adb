//! CUDA graphs: work queued on a [`Gpu`]'s stream recorded once and replayed.

use std::fmt;

use crate::error::KernelError;
use crate::gpu::Gpu;

/// Work recorded by [`Gpu::capture`], replayed on the GPU's stream.
pub struct CapturedGraph {
    graph: cudarc::driver::CudaGraph,
}

impl fmt::Debug for CapturedGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CapturedGraph").finish_non_exhaustive()
    }
}

impl CapturedGraph {
    /// Queues one replay.
    pub fn replay(&self) -> Result<(), KernelError> {
        self.graph
            .launch()
            .map_err(|e| KernelError::driver("graph launch", e))
    }
}

impl Gpu {
    /// Records what `f` queues on the stream as one CUDA graph instead of running it.
    /// The graph replays the same kernels on the same device addresses, so every buffer
    /// `f` uses, scratch buffers it drops back into the pool included, must be left
    /// alone by other work while the graph is replayed, and `f` must take its scratch
    /// from the pool (run it once uncaptured first). That holds for a benchmark that
    /// replays one step's layers and does nothing else; decode steps do not use graphs
    /// yet.
    pub fn capture<R, E: From<KernelError>>(
        &self,
        f: impl FnOnce() -> Result<R, E>,
    ) -> Result<(R, CapturedGraph), E> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| KernelError::driver("begin capture", e))?;
        let out = f();
        // The capture ends whatever `f` returned, so that the stream stays usable.
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| KernelError::driver("end capture", e))?;
        let out = out?;
        let graph = graph.ok_or_else(|| KernelError::Device {
            op: "end capture",
            message: "nothing was captured".into(),
        })?;
        Ok((out, CapturedGraph { graph }))
    }
}
