//! Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; HF
//! `prompt_lookup_num_tokens`): a draft proposer without a draft model. If
//! the last few tokens already occurred earlier in the context, propose the
//! tokens that followed that occurrence. Works well for summarisation,
//! code editing and other input-grounded generation.

/// Proposes up to `k` draft tokens by n-gram matching against `context`
/// (prompt plus generated tokens). For `n` from `max_ngram` down to
/// `min_ngram` (a 0 minimum counts as 1), finds the most recent earlier
/// occurrence of the last `n` tokens (the suffix itself excluded; overlapping
/// occurrences count) that has at least one token after it, and returns the
/// up to `k` tokens that followed it. Longer n-grams are tried first because
/// they predict more reliably. Returns an empty vector when nothing matches.
///
/// Unlike HF, which takes the earliest match, the most recent one is used:
/// recent text is the better predictor of what comes next.
pub fn prompt_lookup(context: &[u32], max_ngram: usize, min_ngram: usize, k: usize) -> Vec<u32> {
    let len = context.len();
    let min_ngram = min_ngram.max(1);
    if k == 0 || max_ngram < min_ngram {
        return Vec::new();
    }
    for n in (min_ngram..=max_ngram).rev() {
        // The suffix starts at len - n; an earlier occurrence starts at
        // s < len - n, so there is always a token after it.
        if n >= len {
            continue;
        }
        let suffix = &context[len - n..];
        let found = (0..len - n).rev().find(|&s| &context[s..s + n] == suffix);
        if let Some(s) = found {
            let from = s + n;
            let to = (from + k).min(len);
            return context[from..to].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_continuation_of_earlier_match() {
        // "a b c d e ... a b" -> propose "c d e".
        let ctx = [1, 2, 3, 4, 5, 9, 9, 1, 2];
        assert_eq!(prompt_lookup(&ctx, 3, 1, 3), vec![3, 4, 5]);
        assert_eq!(prompt_lookup(&ctx, 3, 1, 1), vec![3]);
    }

    #[test]
    fn prefers_longest_ngram() {
        // The 1-gram "2" last occurred before 7, but the 2-gram "1 2"
        // occurred before 3.
        let ctx = [1, 2, 3, 5, 2, 7, 1, 2];
        assert_eq!(prompt_lookup(&ctx, 2, 1, 1), vec![3]);
        assert_eq!(prompt_lookup(&ctx, 1, 1, 1), vec![7]);
    }

    #[test]
    fn prefers_most_recent_occurrence() {
        let ctx = [1, 2, 10, 1, 2, 20, 1, 2];
        assert_eq!(prompt_lookup(&ctx, 2, 2, 1), vec![20]);
    }

    #[test]
    fn proposal_truncated_at_end_and_overlaps_allowed() {
        // Repetition: the most recent earlier "7 7" starts at index 1.
        let ctx = [7, 7, 7, 7];
        assert_eq!(prompt_lookup(&ctx, 2, 1, 5), vec![7]);
        let ctx = [4, 5, 6, 4];
        assert_eq!(prompt_lookup(&ctx, 3, 1, 10), vec![5, 6, 4]);
    }

    #[test]
    fn no_match_or_degenerate_inputs() {
        assert!(prompt_lookup(&[1, 2, 3, 4], 3, 1, 4).is_empty());
        assert!(prompt_lookup(&[], 3, 1, 4).is_empty());
        assert!(prompt_lookup(&[5], 3, 1, 4).is_empty());
        assert!(prompt_lookup(&[1, 2, 1], 3, 1, 0).is_empty());
        assert!(prompt_lookup(&[1, 2, 1], 1, 2, 3).is_empty());
        // min_ngram 0 acts as 1.
        assert_eq!(prompt_lookup(&[1, 2, 1], 1, 0, 3), vec![2, 1]);
        // The suffix alone never matches itself.
        assert!(prompt_lookup(&[1, 2, 3], 3, 3, 2).is_empty());
    }
}
