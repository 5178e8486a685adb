//! Sampling parameters (HF `generate` names and meanings) and the errors that
//! sampling can report.

use crate::sampling::rng::Rng;

/// Errors from validating parameters or sampling from logits.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// Temperature must be finite and `>= 0` (0 means greedy).
    #[error("invalid temperature {value}: must be finite and >= 0")]
    InvalidTemperature { value: f32 },
    /// `top_p` must lie in `(0, 1]` (1 disables it).
    #[error("invalid top_p {value}: must be in (0, 1]")]
    InvalidTopP { value: f32 },
    /// Repetition penalty must be finite and `> 0` (1 disables it).
    #[error("invalid repetition penalty {value}: must be finite and > 0")]
    InvalidRepetitionPenalty { value: f32 },
    /// The logits slice was empty.
    #[error("empty logits")]
    EmptyLogits,
    /// No logit could receive probability: every entry is NaN or `-inf`.
    #[error("no usable logits: every entry is NaN or -inf")]
    NoFiniteLogits,
}

/// How to pick the next token. Defaults match HF `generate(do_sample=True)`
/// with every filter off: plain sampling at temperature 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Logits are divided by this before softmax; exactly 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` largest logits (ties kept); 0 disables.
    pub top_k: usize,
    /// Nucleus sampling mass; 1.0 disables.
    pub top_p: f32,
    /// HF repetition penalty (CTRL paper); 1.0 disables.
    pub repetition_penalty: f32,
    /// Seed for the [`Rng`] that draws tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (argmax), no filters.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether these parameters mean argmax decoding (temperature exactly 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether a token depends on nothing but the argmax of the raw logits (greedy
    /// without a repetition penalty), so that the logits need not leave the device.
    pub fn argmax_only(&self) -> bool {
        self.is_greedy() && self.repetition_penalty == 1.0
    }

    /// A fresh [`Rng`] seeded with [`Self::seed`].
    pub fn rng(&self) -> Rng {
        Rng::new(self.seed)
    }

    /// Checks every field's range; `top_k` and `seed` accept any value.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(SamplingError::InvalidTemperature { value: t });
        }
        // Written so that NaN fails the check.
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(SamplingError::InvalidTopP { value: p });
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return Err(SamplingError::InvalidRepetitionPenalty { value: r });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_greedy() {
        let d = SamplingParams::default();
        assert_eq!(d.temperature, 1.0);
        assert_eq!(d.top_k, 0);
        assert_eq!(d.top_p, 1.0);
        assert_eq!(d.repetition_penalty, 1.0);
        assert!(!d.is_greedy());
        assert!(SamplingParams::greedy().is_greedy());
        assert_eq!(d.validate(), Ok(()));
        assert_eq!(SamplingParams::greedy().validate(), Ok(()));
    }

    #[test]
    fn rng_uses_seed() {
        let p = SamplingParams {
            seed: 9,
            ..SamplingParams::default()
        };
        assert_eq!(p.rng(), Rng::new(9));
    }

    #[test]
    fn validate_rejects_bad_values() {
        let base = SamplingParams::default();
        for t in [-0.1, f32::NAN, f32::INFINITY] {
            let p = SamplingParams {
                temperature: t,
                ..base
            };
            assert!(matches!(
                p.validate(),
                Err(SamplingError::InvalidTemperature { .. })
            ));
        }
        for tp in [0.0, -1.0, 1.01, f32::NAN] {
            let p = SamplingParams { top_p: tp, ..base };
            assert!(matches!(
                p.validate(),
                Err(SamplingError::InvalidTopP { .. })
            ));
        }
        for r in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let p = SamplingParams {
                repetition_penalty: r,
                ..base
            };
            assert!(matches!(
                p.validate(),
                Err(SamplingError::InvalidRepetitionPenalty { .. })
            ));
        }
        let ok = SamplingParams {
            temperature: 0.7,
            top_k: 50,
            top_p: 0.9,
            repetition_penalty: 1.2,
            seed: 1,
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn error_messages_carry_values() {
        let e = SamplingError::InvalidTopP { value: 1.5 };
        assert!(e.to_string().contains("1.5"));
    }
}
