//! The one error type of the CUDA launchers: the engine maps it onto its `BackendError`.

use thiserror::Error;

/// A CUDA operation that could not run.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// No usable GPU or CUDA library on this machine.
    #[error("{0}")]
    Unavailable(String),
    #[error("out of device memory: {requested} bytes requested")]
    OutOfMemory { requested: usize },
    /// The driver, NVRTC or cuBLAS reported an error.
    #[error("{op}: {message}")]
    Device { op: &'static str, message: String },
    /// Operands that do not fit the kernel (shapes, indices, unsupported sizes).
    #[error("{op}: {message}")]
    Invalid { op: &'static str, message: String },
}

impl KernelError {
    pub(crate) fn invalid(op: &'static str, message: impl Into<String>) -> Self {
        KernelError::Invalid {
            op,
            message: message.into(),
        }
    }

    pub(crate) fn driver(op: &'static str, e: cudarc::driver::DriverError) -> Self {
        KernelError::Device {
            op,
            message: format!("{e:?}"),
        }
    }
}
