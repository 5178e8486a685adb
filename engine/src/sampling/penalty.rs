//! The context of a repetition penalty as a set: the distinct token ids a row's logits
//! are penalised at (HF gathers then scatters, so a repeated token counts once, and ids
//! outside the vocabulary touch nothing). A set over the vocabulary lets the rows of a
//! chunk share their history: it is read once per chunk, and each row adds its own
//! tokens, instead of every row copying and sorting a context that at long contexts
//! holds tens of thousands of ids.

/// Distinct token ids below a vocabulary size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PenaltyContext {
    words: Vec<u64>,
    vocab: usize,
}

impl PenaltyContext {
    /// The empty set over `vocab` ids.
    pub fn new(vocab: usize) -> Self {
        PenaltyContext {
            words: vec![0; vocab.div_ceil(64)],
            vocab,
        }
    }

    /// Adds `ids`; ids at or past the vocabulary size are left out.
    pub fn extend(&mut self, ids: &[u32]) {
        for &id in ids {
            let i = id as usize;
            if i < self.vocab {
                self.words[i / 64] |= 1 << (i % 64);
            }
        }
    }

    /// The set's ids in increasing order.
    pub fn ids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for (w, &bits) in self.words.iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                out.push((w * 64) as u32 + b.trailing_zeros());
                b &= b - 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::apply_repetition_penalty;

    fn sorted_distinct(ids: &[u32], vocab: usize) -> Vec<u32> {
        let mut v: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| (i as usize) < vocab)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    #[test]
    fn ids_are_the_distinct_in_vocabulary_ids_in_order() {
        let mut state = 12345u64;
        for vocab in [1usize, 63, 64, 65, 300, 65024] {
            let ids: Vec<u32> = (0..500)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % (vocab as u64 + 40)) as u32
                })
                .collect();
            let mut set = PenaltyContext::new(vocab);
            set.extend(&ids[..200]);
            set.extend(&ids[200..]);
            assert_eq!(set.ids(), sorted_distinct(&ids, vocab), "vocab {vocab}");
        }
        assert!(PenaltyContext::new(10).ids().is_empty());
    }

    #[test]
    fn penalising_the_set_equals_penalising_the_context() {
        let logits: Vec<f32> = (0..130).map(|i| (i as f32 - 60.0) / 7.0).collect();
        let context = [5u32, 129, 5, 64, 63, 200, 0, 64, 129];
        let mut set = PenaltyContext::new(logits.len());
        set.extend(&context);
        let (mut a, mut b) = (logits.clone(), logits);
        apply_repetition_penalty(&mut a, &context, 1.3);
        apply_repetition_penalty(&mut b, &set.ids(), 1.3);
        assert_eq!(a, b);
        assert_ne!(a[5], (5.0 - 60.0) / 7.0);
    }
}
