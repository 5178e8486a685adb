//! Rotary position embeddings (GPT-NeoX "rotate half"), with the inverse-frequency
//! formulas of HF `modeling_rope_utils.py` for default, linear, dynamic NTK and YaRN.
//!
//! Dynamic NTK depends on the sequence length. HF recomputes the base whenever a call
//! reaches a new maximum position, so the prompt is rotated with the base for its own
//! length and each later token with the base for its position + 1, and cached keys keep
//! the rotation they were written with. falconer gives each token the length
//! `max(position + 1, prompt length)`: identical to HF for prefill followed by decoding,
//! and independent of how later tokens are grouped into calls, which is what makes a
//! speculative verify pass equal to decoding the same tokens one at a time.

use crate::config::{RopeConfig, RopeScaling};

/// Precomputed rotary parameters for one model.
#[derive(Debug, Clone)]
pub struct Rope {
    config: RopeConfig,
    head_dim: usize,
    /// Inverse frequencies for every kind but dynamic (which depends on the length).
    inv_freq: Vec<f32>,
    attention_scaling: f32,
}

impl Rope {
    pub fn new(config: &RopeConfig, head_dim: usize) -> Self {
        let (inv_freq, attention_scaling) = inv_freq(config, head_dim, 0);
        Rope {
            config: config.clone(),
            head_dim,
            inv_freq,
            attention_scaling,
        }
    }

    /// Half the head dimension: the number of rotated pairs.
    pub fn half_dim(&self) -> usize {
        self.head_dim / 2
    }

    /// Appends `half_dim` cosines and sines for a token at `position` whose dynamic-NTK
    /// length is `effective_len` (ignored by the other kinds).
    pub fn push_cos_sin(
        &self,
        position: usize,
        effective_len: usize,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        let dynamic;
        let (freqs, scale) = if matches!(self.config.scaling, RopeScaling::Dynamic { .. }) {
            dynamic = inv_freq(&self.config, self.head_dim, effective_len);
            (&dynamic.0, dynamic.1)
        } else {
            (&self.inv_freq, self.attention_scaling)
        };
        let pos = position as f32;
        for &f in freqs {
            // HF multiplies in f32, then takes cos/sin of that f32 angle.
            let angle = f64::from(f * pos);
            cos.push(angle.cos() as f32 * scale);
            sin.push(angle.sin() as f32 * scale);
        }
    }
}

/// HF's `rope_init_fn`: inverse frequencies (`head_dim / 2` of them) and the factor
/// applied to cos and sin. `seq_len` only matters for dynamic NTK.
pub fn inv_freq(config: &RopeConfig, head_dim: usize, seq_len: usize) -> (Vec<f32>, f32) {
    let dim = head_dim as f64;
    let base_freqs = |base: f64| -> Vec<f64> {
        (0..head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim))
            .collect()
    };
    let (freqs, scaling) = match &config.scaling {
        RopeScaling::None => (base_freqs(config.theta), 1.0),
        RopeScaling::Linear { factor } => (
            base_freqs(config.theta)
                .into_iter()
                .map(|f| f / factor)
                .collect(),
            1.0,
        ),
        RopeScaling::Dynamic {
            factor,
            max_position_embeddings,
        } => {
            let max = *max_position_embeddings as f64;
            let len = (seq_len as f64).max(max);
            let base =
                config.theta * ((factor * len / max) - (factor - 1.0)).powf(dim / (dim - 2.0));
            (base_freqs(base), 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            attention_factor,
            beta_fast,
            beta_slow,
            truncate,
        } => {
            let base = config.theta;
            let orig = *original_max_position_embeddings as f64;
            let correction_dim = |rotations: f64| {
                dim * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
            };
            let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0);
            let high = high.min(dim - 1.0);
            let span = if low == high { 0.001 } else { high - low };
            let freqs = (0..head_dim / 2)
                .map(|i| {
                    let pos_freq = base.powf((2 * i) as f64 / dim);
                    let extrapolation = 1.0 / pos_freq;
                    let interpolation = 1.0 / (factor * pos_freq);
                    let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                    let extrapolation_weight = 1.0 - ramp;
                    interpolation * (1.0 - extrapolation_weight)
                        + extrapolation * extrapolation_weight
                })
                .collect();
            (freqs, *attention_factor)
        }
    };
    (
        freqs.into_iter().map(|f| f as f32).collect(),
        scaling as f32,
    )
}

/// Rotates one head vector in place with precomputed cos/sin (`x.len() == 2 * cos.len()`).
pub fn rotate_half_in_place(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (lo, hi) = x.split_at_mut(half);
    for j in 0..half {
        let (a, b) = (lo[j], hi[j]);
        lo[j] = a * cos[j] - b * sin[j];
        hi[j] = b * cos[j] + a * sin[j];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scaling: RopeScaling) -> RopeConfig {
        RopeConfig {
            theta: 10_000.0,
            scaling,
        }
    }

    #[test]
    fn default_frequencies_follow_theta_powers() {
        let (f, s) = inv_freq(&cfg(RopeScaling::None), 8, 0);
        assert_eq!(s, 1.0);
        assert_eq!(f.len(), 4);
        assert!((f[0] - 1.0).abs() < 1e-7);
        assert!((f[1] - 0.1).abs() < 1e-7);
        assert!((f[3] - 0.001).abs() < 1e-9);
    }

    #[test]
    fn linear_divides_by_factor() {
        let (d, _) = inv_freq(&cfg(RopeScaling::None), 8, 0);
        let (l, _) = inv_freq(&cfg(RopeScaling::Linear { factor: 4.0 }), 8, 0);
        for (a, b) in d.iter().zip(&l) {
            assert!((a / 4.0 - b).abs() < 1e-9);
        }
    }

    #[test]
    fn dynamic_is_default_until_max_then_grows_base() {
        let dynamic = cfg(RopeScaling::Dynamic {
            factor: 2.0,
            max_position_embeddings: 16,
        });
        let (d, _) = inv_freq(&cfg(RopeScaling::None), 8, 0);
        assert_eq!(inv_freq(&dynamic, 8, 10).0, d);
        let (grown, _) = inv_freq(&dynamic, 8, 32);
        // base * (2*32/16 - 1)^(8/6) = base * 3^(4/3)
        let base = 10_000.0f64 * 3f64.powf(4.0 / 3.0);
        assert!((f64::from(grown[1]) - 1.0 / base.powf(0.25)).abs() < 1e-7);
        assert_eq!(grown[0], 1.0);
    }

    #[test]
    fn yarn_blends_and_scales() {
        let yarn = cfg(RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 16,
            attention_factor: 0.1 * 4f64.ln() + 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
        });
        let (f, s) = inv_freq(&yarn, 64, 0);
        let (d, _) = inv_freq(&cfg(RopeScaling::None), 64, 0);
        assert!((s - 1.138_629_4).abs() < 1e-6);
        // Highest frequencies extrapolate (unchanged), lowest interpolate (divided).
        assert_eq!(f[0], d[0]);
        assert!((f[31] - d[31] / 4.0).abs() < 1e-12);
    }

    #[test]
    fn rotation_preserves_norm_and_is_identity_at_zero() {
        let rope = Rope::new(&cfg(RopeScaling::None), 8);
        let (mut c, mut s) = (vec![], vec![]);
        rope.push_cos_sin(0, 1, &mut c, &mut s);
        let mut x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        rotate_half_in_place(&mut x, &c, &s);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let (mut c, mut s) = (vec![], vec![]);
        rope.push_cos_sin(17, 18, &mut c, &mut s);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        let before = norm(&x);
        rotate_half_in_place(&mut x, &c, &s);
        assert!((norm(&x) - before).abs() < 1e-3);
    }
}
