//! Paged KV-cache bookkeeping: a block allocator with reference counts and per-sequence
//! block tables (allocate, append, truncate on rejection, free, prefix sharing with
//! copy-on-write). Pure logic: the KV memory itself belongs to a backend; this module
//! only decides which block each position lives in, and which blocks must be copied.

mod allocator;
mod pool;

pub use allocator::BlockAllocator;
pub use pool::{KvPool, SeqId};
