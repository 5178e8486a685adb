//! Device memory: typed buffers, freed stream-ordered on drop or handed back to the pool
//! of freed scratch buffers they came from (see [`crate::gpu`] for why reuse is safe).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::error::KernelError;

/// Element types a [`DeviceBuffer`] may hold.
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static {}
impl Elem for f32 {}
impl Elem for u8 {}
impl Elem for u32 {}
impl Elem for u64 {}
impl Elem for half::bf16 {}

/// A typed allocation in device memory, freed (stream-ordered) on drop, or returned to
/// its GPU's pool when it came from one.
pub struct DeviceBuffer<T: Elem> {
    /// Always `Some` while the buffer lives; taken by `Drop`.
    pub(crate) slice: Option<CudaSlice<T>>,
    /// Elements the caller asked for (cudarc cannot allocate zero bytes, so an empty
    /// buffer holds one element).
    pub(crate) len: usize,
    pub(crate) ptr: u64,
    pub(crate) pool: Option<Arc<Pool>>,
}

impl<T: Elem> fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("len", &self.len)
            .field("bytes", &self.num_bytes())
            .field("pooled", &self.pool.is_some())
            .finish()
    }
}

impl<T: Elem> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn num_bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// Device address of element `i` (for kernel arguments).
    pub(crate) fn ptr_at(&self, i: usize) -> u64 {
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }

    /// The ordinal of the GPU whose memory this is.
    pub fn ordinal(&self) -> Result<usize, KernelError> {
        Ok(self.inner()?.ordinal())
    }

    pub(crate) fn inner(&self) -> Result<&CudaSlice<T>, KernelError> {
        self.slice.as_ref().ok_or_else(released)
    }

    pub(crate) fn inner_mut(&mut self) -> Result<&mut CudaSlice<T>, KernelError> {
        self.slice.as_mut().ok_or_else(released)
    }
}

pub(crate) fn released() -> KernelError {
    KernelError::Device {
        op: "buffer",
        message: "buffer already released".into(),
    }
}

impl<T: Elem> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if let (Some(pool), Some(slice)) = (self.pool.take(), self.slice.take()) {
            pool.put(slice);
        }
    }
}

/// A freed `CudaSlice<T>` of some element type, with its size in bytes.
type Pooled = (Box<dyn Any + Send>, usize);

/// Freed scratch buffers by element type and length.
#[derive(Default)]
pub(crate) struct Pool {
    free: Mutex<HashMap<(TypeId, usize), Vec<Pooled>>>,
    bytes: AtomicUsize,
    /// Keeps every buffer (a recorded step's pool: freeing while a graph is captured
    /// would put the free into the graph).
    unbounded: bool,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .field("unbounded", &self.unbounded)
            .finish()
    }
}

/// The pool keeps at most this much memory, and no single buffer above `POOL_MAX_ONE`
/// (those are rare and large: freeing them is cheap by comparison).
const POOL_MAX_BYTES: usize = 4 << 30;
const POOL_MAX_ONE: usize = 1 << 30;

impl Pool {
    /// A pool that keeps every buffer handed back to it.
    pub(crate) fn unbounded() -> Self {
        Pool {
            unbounded: true,
            ..Pool::default()
        }
    }

    pub(crate) fn take<T: Elem>(&self, len: usize) -> Option<CudaSlice<T>> {
        let mut free = self.free.lock().ok()?;
        let (slice, _) = free.get_mut(&(TypeId::of::<T>(), len))?.pop()?;
        let slice = slice.downcast::<CudaSlice<T>>().ok()?;
        self.bytes.fetch_sub(slice.num_bytes(), Ordering::Relaxed);
        Some(*slice)
    }

    /// Keeps `slice` for reuse, or frees it (by dropping it) when the pool is full.
    pub(crate) fn put<T: Elem>(&self, slice: CudaSlice<T>) {
        let bytes = slice.num_bytes();
        if !self.unbounded
            && (bytes > POOL_MAX_ONE || self.bytes.load(Ordering::Relaxed) + bytes > POOL_MAX_BYTES)
        {
            return;
        }
        if let Ok(mut free) = self.free.lock() {
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
            free.entry((TypeId::of::<T>(), slice.len()))
                .or_default()
                .push((Box::new(slice), bytes));
        }
    }

    /// Moves every buffer of this pool into `to`, whatever `to` keeps otherwise (they
    /// came from it: see `Gpu::fork_with`).
    pub(crate) fn drain_into(&self, to: &Pool) {
        let (Ok(mut from), Ok(mut into)) = (self.free.lock(), to.free.lock()) else {
            return;
        };
        for (key, slices) in from.drain() {
            let bytes: usize = slices.iter().map(|(_, b)| b).sum();
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
            to.bytes.fetch_add(bytes, Ordering::Relaxed);
            into.entry(key).or_default().extend(slices);
        }
    }
}
