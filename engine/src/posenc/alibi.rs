//! ALiBi attention biases (falcon-rw layout), exactly as HF `build_alibi_tensor` makes
//! them: slopes are rounded to bf16 and the slope * key-position product is rounded to
//! bf16 again, then divided by sqrt(head_dim). Matching that rounding is what keeps the
//! logits within 1e-4 of transformers.

use half::bf16;

/// One slope per head (HF's closest-power-of-two construction), already rounded to bf16.
pub fn slopes(num_heads: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - num_heads.leading_zeros());
    let base = |n: usize| 2f32.powf(-(2f32.powf(-((n as f32).log2() - 3.0))));
    let b = base(closest);
    let mut out: Vec<f32> = (1..=closest).map(|p| b.powi(p as i32)).collect();
    if closest != num_heads {
        let extra = base(2 * closest);
        let remaining = closest.min(num_heads - closest);
        out.extend((0..remaining).map(|i| extra.powi((2 * i + 1) as i32)));
    }
    out.into_iter()
        .map(|s| bf16::from_f32(s).to_f32())
        .collect()
}

/// The bias added to the scaled score of a key at `key_pos` for a head with `slope`.
pub fn bias(slope: f32, key_pos: usize, head_dim: usize) -> f32 {
    let pos = bf16::from_f32(key_pos as f32).to_f32();
    bf16::from_f32(slope * pos).to_f32() / (head_dim as f32).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_of_two_heads_match_the_paper() {
        let s = slopes(8);
        let expect: Vec<f32> = (1..=8).map(|i| 0.5f32.powi(i)).collect();
        assert_eq!(s, expect);
    }

    #[test]
    fn other_head_counts_interleave_extra_slopes() {
        let s = slopes(6);
        assert_eq!(s.len(), 6);
        // 4 slopes of base 2^-2, then 2 of base 2^-1 at odd powers.
        assert_eq!(&s[..4], &[0.25, 0.0625, 0.015625, 0.00390625]);
        assert_eq!(&s[4..], &[0.5, 0.125]);
    }

    #[test]
    fn bias_rounds_like_bf16() {
        // slope 1/3 is not a bf16 value: the rounded product differs from the exact one.
        let slope = bf16::from_f32(1.0 / 3.0).to_f32();
        let b = bias(slope, 7, 1);
        assert_eq!(b, bf16::from_f32(slope * 7.0).to_f32());
    }
}
