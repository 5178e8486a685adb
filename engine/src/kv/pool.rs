//! Per-sequence block tables over one [`BlockAllocator`].

use std::collections::HashMap;

use super::BlockAllocator;
use crate::error::KvError;

/// A sequence's id within one pool (the runtime uses one id per session).
pub type SeqId = u64;

#[derive(Debug, Clone, Default)]
struct SeqBlocks {
    blocks: Vec<u32>,
    /// Positions whose K/V are written.
    len: usize,
}

/// Block tables of every live sequence of one model's KV memory.
#[derive(Debug, Clone)]
pub struct KvPool {
    alloc: BlockAllocator,
    block_size: usize,
    seqs: HashMap<SeqId, SeqBlocks>,
}

impl KvPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        KvPool {
            alloc: BlockAllocator::new(num_blocks),
            block_size: block_size.max(1),
            seqs: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.alloc.total()
    }

    pub fn free_blocks(&self) -> usize {
        self.alloc.free_count()
    }

    pub fn used_blocks(&self) -> usize {
        self.alloc.used_count()
    }

    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Registers an empty sequence.
    pub fn add(&mut self, seq: SeqId) -> Result<(), KvError> {
        if self.seqs.contains_key(&seq) {
            return Err(KvError::DuplicateSequence { seq });
        }
        self.seqs.insert(seq, SeqBlocks::default());
        Ok(())
    }

    /// Positions of `seq` whose K/V are written.
    pub fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        self.get(seq).map(|s| s.len)
    }

    /// Block ids of `seq`, in position order.
    pub fn table(&self, seq: SeqId) -> Result<&[u32], KvError> {
        self.get(seq).map(|s| s.blocks.as_slice())
    }

    fn get(&self, seq: SeqId) -> Result<&SeqBlocks, KvError> {
        self.seqs.get(&seq).ok_or(KvError::UnknownSequence { seq })
    }

    /// Blocks needed to grow `seq` to `new_len` positions (including a copy-on-write
    /// replacement of a shared, partly written last block).
    pub fn blocks_needed(&self, seq: SeqId, new_len: usize) -> Result<usize, KvError> {
        let s = self.get(seq)?;
        let want = new_len.div_ceil(self.block_size);
        let grow = want.saturating_sub(s.blocks.len());
        Ok(grow + usize::from(self.cow_index(s, new_len).is_some()))
    }

    /// The index of the block that must be copied before positions `len..new_len` are
    /// written into it: a shared block holding both old and new positions.
    fn cow_index(&self, s: &SeqBlocks, new_len: usize) -> Option<usize> {
        if new_len <= s.len || s.len.is_multiple_of(self.block_size) {
            return None;
        }
        let i = s.len / self.block_size;
        let b = *s.blocks.get(i)?;
        (self.alloc.refcount(b) > 1).then_some(i)
    }

    /// Makes room for positions `len..new_len` of `seq`. Atomic: on `OutOfBlocks`
    /// nothing changes. Returns the `(src, dst)` block copies the backend must perform
    /// first (copy-on-write of a shared prefix block).
    pub fn reserve(&mut self, seq: SeqId, new_len: usize) -> Result<Vec<(u32, u32)>, KvError> {
        let needed = self.blocks_needed(seq, new_len)?;
        if needed > self.alloc.free_count() {
            return Err(KvError::OutOfBlocks {
                needed,
                free: self.alloc.free_count(),
                total: self.alloc.total(),
            });
        }
        let s = self.get(seq)?;
        let cow = self.cow_index(s, new_len);
        let want = new_len.div_ceil(self.block_size);
        let mut copies = Vec::new();
        let mut fresh = Vec::with_capacity(needed);
        for _ in 0..needed {
            // Checked above: enough blocks are free.
            match self.alloc.allocate() {
                Some(b) => fresh.push(b),
                None => unreachable!("free count checked before allocating"),
            }
        }
        let mut fresh = fresh.into_iter();
        let Some(s) = self.seqs.get_mut(&seq) else {
            unreachable!("sequence looked up above")
        };
        if let Some(i) = cow {
            if let Some(dst) = fresh.next() {
                let src = s.blocks[i];
                copies.push((src, dst));
                s.blocks[i] = dst;
                self.alloc.release(src);
            }
        }
        while s.blocks.len() < want {
            match fresh.next() {
                Some(b) => s.blocks.push(b),
                None => break,
            }
        }
        Ok(copies)
    }

    /// Records that positions up to `len` are written (after a successful forward).
    pub fn set_len(&mut self, seq: SeqId, len: usize) -> Result<(), KvError> {
        let bs = self.block_size;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence { seq })?;
        debug_assert!(len <= s.blocks.len() * bs, "set_len beyond reserved blocks");
        s.len = len.min(s.blocks.len() * bs);
        Ok(())
    }

    /// After a forward pass over reserved positions: `len` positions are valid (the
    /// rest, e.g. rejected drafts, are dropped) and blocks past them are freed.
    pub fn commit_len(&mut self, seq: SeqId, len: usize) -> Result<(), KvError> {
        self.set_len(seq, len)?;
        let cached = self.len(seq)?;
        self.truncate(seq, cached)
    }

    /// Rolls `seq` back to `len` positions, freeing blocks past it (rejected drafts).
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<(), KvError> {
        let bs = self.block_size;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence { seq })?;
        if len > s.len {
            return Err(KvError::TruncateBeyondEnd {
                seq,
                len,
                cached: s.len,
            });
        }
        let keep = len.div_ceil(bs);
        for b in s.blocks.drain(keep..) {
            self.alloc.release(b);
        }
        s.len = len;
        Ok(())
    }

    /// A new sequence sharing the first `len` positions of `parent` (e.g. one system
    /// prompt used by many sessions). Full blocks are shared; a partly filled last block
    /// is shared too and copied on the first write.
    pub fn fork(&mut self, parent: SeqId, child: SeqId, len: usize) -> Result<(), KvError> {
        if self.seqs.contains_key(&child) {
            return Err(KvError::DuplicateSequence { seq: child });
        }
        let p = self.get(parent)?;
        if len > p.len {
            return Err(KvError::TruncateBeyondEnd {
                seq: parent,
                len,
                cached: p.len,
            });
        }
        let blocks: Vec<u32> = p.blocks[..len.div_ceil(self.block_size)].to_vec();
        for &b in &blocks {
            self.alloc.retain(b);
        }
        self.seqs.insert(child, SeqBlocks { blocks, len });
        Ok(())
    }

    /// Frees every block of `seq` (finished, cancelled or failed).
    pub fn remove(&mut self, seq: SeqId) -> Result<(), KvError> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or(KvError::UnknownSequence { seq })?;
        for b in s.blocks {
            self.alloc.release(b);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reserve_truncate_remove_round_trip() {
        let mut p = KvPool::new(4, 4);
        p.add(1).unwrap();
        assert!(p.reserve(1, 6).unwrap().is_empty());
        p.set_len(1, 6).unwrap();
        assert_eq!(p.table(1).unwrap().len(), 2);
        p.truncate(1, 3).unwrap();
        assert_eq!(p.table(1).unwrap().len(), 1);
        assert_eq!(p.free_blocks(), 3);
        p.remove(1).unwrap();
        assert_eq!(p.free_blocks(), 4);
    }

    #[test]
    fn full_cache_is_a_typed_error_and_changes_nothing() {
        let mut p = KvPool::new(2, 4);
        p.add(1).unwrap();
        let err = p.reserve(1, 9).unwrap_err();
        assert_eq!(
            err,
            KvError::OutOfBlocks {
                needed: 3,
                free: 2,
                total: 2
            }
        );
        assert_eq!(p.free_blocks(), 2);
        assert!(p.table(1).unwrap().is_empty());
    }

    #[test]
    fn fork_shares_blocks_and_copies_on_write() {
        let mut p = KvPool::new(8, 4);
        p.add(1).unwrap();
        p.reserve(1, 6).unwrap();
        p.set_len(1, 6).unwrap();
        p.fork(1, 2, 6).unwrap();
        assert_eq!(p.used_blocks(), 2);
        assert_eq!(p.table(1).unwrap(), p.table(2).unwrap());
        // Writing position 6 of the child touches the shared half-full block 1.
        let copies = p.reserve(2, 7).unwrap();
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].0, p.table(1).unwrap()[1]);
        assert_eq!(p.table(2).unwrap()[0], p.table(1).unwrap()[0]);
        assert_ne!(p.table(2).unwrap()[1], p.table(1).unwrap()[1]);
        p.remove(1).unwrap();
        p.remove(2).unwrap();
        assert_eq!(p.free_blocks(), 8);
    }

    proptest! {
        /// Any interleaving of operations leaks no block and never double-frees.
        #[test]
        fn random_operations_leak_nothing(ops in proptest::collection::vec((0u8..5, 0u64..4, 0usize..20), 1..80)) {
            let mut p = KvPool::new(12, 4);
            for (op, seq, n) in ops {
                match op {
                    0 => { let _ = p.add(seq); }
                    1 => {
                        if let Ok(len) = p.len(seq) {
                            if p.reserve(seq, len + n).is_ok() { p.set_len(seq, len + n).unwrap(); }
                        }
                    }
                    2 => { if let Ok(len) = p.len(seq) { p.truncate(seq, len.saturating_sub(n)).unwrap(); } }
                    3 => { let _ = p.fork(seq, seq + 10, p.len(seq).unwrap_or(0)); }
                    _ => { let _ = p.remove(seq); }
                }
                let held: usize = p.seqs.values().map(|s| s.blocks.len()).sum();
                prop_assert!(p.used_blocks() <= held || held == 0 && p.used_blocks() == 0);
            }
            let ids: Vec<SeqId> = p.seqs.keys().copied().collect();
            for id in ids { p.remove(id).unwrap(); }
            prop_assert_eq!(p.free_blocks(), 12);
        }
    }
}
