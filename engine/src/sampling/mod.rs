//! Token sampling with HF transformers semantics: parameters, a reproducible
//! PRNG, logits warpers (repetition penalty, temperature, top-k, top-p),
//! drawing a token, and stop conditions. Pure functions over f32 logits
//! slices and `u32` token ids; no model or tensor types.

pub mod params;
pub mod penalty;
pub mod rng;
pub mod sample;
pub mod stop;
pub mod warp;

#[cfg(test)]
mod proptests;
#[cfg(test)]
pub(crate) mod testutil;

pub use params::{SamplingError, SamplingParams};
pub use penalty::PenaltyContext;
pub use rng::Rng;
pub use sample::{sample_from_probs, sample_token};
pub use stop::{FinishReason, Stop, StopChecker, StopCriteria};
pub use warp::{apply_repetition_penalty, argmax, greedy_token, warp_penalised, warp_probs};
