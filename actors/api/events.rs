//! What a host receives: a typed stream of token events ending in one `Finished` (or
//! `Error`) event, with usage and speculative-acceptance figures.

use std::time::Duration;

pub use falconer_engine::sampling::FinishReason;

use crate::error::RuntimeError;

/// One event of a generation stream.
#[derive(Debug, Clone)]
pub enum TokenEvent {
    /// A generated token and the text that became safe to show with it (empty while a
    /// multi-byte character or a possible stop string is incomplete).
    Token { id: u32, text: String },
    /// The last event of a successful generation.
    Finished(Finished),
    /// The request failed; no more events follow.
    Error(RuntimeError),
}

/// The end of a generation.
#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: FinishReason,
    /// Every generated id (an EOS id included when it ended the reply).
    pub ids: Vec<u32>,
    /// The generated text, cut before any stop string.
    pub text: String,
    pub usage: Usage,
}

/// Token counts and speculative-decoding figures of one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Forward passes of the target that produced tokens for this request.
    pub target_passes: usize,
    /// Rounds in which drafts were proposed.
    pub speculative_rounds: usize,
    pub draft_tokens_proposed: usize,
    pub draft_tokens_accepted: usize,
    pub elapsed: Duration,
}

impl Usage {
    /// Accepted / proposed draft tokens, if any were proposed.
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.draft_tokens_proposed > 0)
            .then(|| self.draft_tokens_accepted as f64 / self.draft_tokens_proposed as f64)
    }

    /// Generated tokens per target pass (1.0 for plain decoding).
    pub fn tokens_per_pass(&self) -> f64 {
        if self.target_passes == 0 {
            0.0
        } else {
            self.generated_tokens as f64 / self.target_passes as f64
        }
    }

    /// Generated tokens per second of wall time.
    pub fn tokens_per_second(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.generated_tokens as f64 / s
        } else {
            0.0
        }
    }
}
