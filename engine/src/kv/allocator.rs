//! Fixed-size block allocator with reference counts (a block shared by several
//! sequences is freed when the last one lets go).

/// Hands out block ids `0..num_blocks`.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    refcount: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        BlockAllocator {
            // Reversed so that blocks are handed out in ascending order.
            free: (0..num_blocks as u32).rev().collect(),
            refcount: vec![0; num_blocks],
        }
    }

    pub fn total(&self) -> usize {
        self.refcount.len()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn used_count(&self) -> usize {
        self.total() - self.free_count()
    }

    pub fn refcount(&self, block: u32) -> u32 {
        self.refcount.get(block as usize).copied().unwrap_or(0)
    }

    /// A fresh block with one reference, or `None` when none is free.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = self.free.pop()?;
        self.refcount[b as usize] = 1;
        Some(b)
    }

    /// One more holder of an allocated block.
    pub fn retain(&mut self, block: u32) {
        if let Some(rc) = self.refcount.get_mut(block as usize) {
            debug_assert!(*rc > 0, "retain of a free block");
            *rc += 1;
        }
    }

    /// Drops one reference; the block returns to the free list at zero.
    pub fn release(&mut self, block: u32) {
        if let Some(rc) = self.refcount.get_mut(block as usize) {
            if *rc == 0 {
                debug_assert!(false, "double free of block {block}");
                return;
            }
            *rc -= 1;
            if *rc == 0 {
                self.free.push(block);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_until_empty_and_recycles() {
        let mut a = BlockAllocator::new(2);
        let x = a.allocate();
        let y = a.allocate();
        assert_eq!((x, y), (Some(0), Some(1)));
        assert_eq!(a.allocate(), None);
        a.release(0);
        assert_eq!(a.free_count(), 1);
        assert_eq!(a.allocate(), Some(0));
    }

    #[test]
    fn shared_block_is_freed_by_last_holder() {
        let mut a = BlockAllocator::new(1);
        let b = a.allocate().unwrap_or(u32::MAX);
        a.retain(b);
        a.release(b);
        assert_eq!(a.free_count(), 0);
        a.release(b);
        assert_eq!(a.free_count(), 1);
    }
}
