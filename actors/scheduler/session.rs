//! One request's decoding state: its tokens, how much of them each model has cached,
//! its draft-length policy, stop detection and streaming. Plain logic; the scheduler
//! drives it.

use std::time::Instant;

use falconer_engine::sampling::{FinishReason, SamplingParams, StopChecker};
use falconer_engine::speculative::{DraftLengthPolicy, Verdict};
use falconer_engine::Tokenizer;
use tokio::sync::mpsc;

use crate::api::events::{Finished, TokenEvent, Usage};

/// Where a session's proposals come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proposer {
    None,
    Draft,
    Lookup,
}

/// A live request.
#[derive(Debug)]
pub(crate) struct Session {
    pub id: u64,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Positions cached by the target (all but the last token between rounds).
    pub target_len: usize,
    /// Positions cached by the draft.
    pub draft_len: usize,
    pub proposer: Proposer,
    pub policy: DraftLengthPolicy,
    pub params: SamplingParams,
    pub stop: StopChecker,
    pub max_new_tokens: usize,
    pub tx: mpsc::Sender<TokenEvent>,
    pub usage: Usage,
    pub started: Instant,
    /// Bytes of generated text already streamed.
    pub emitted_text: usize,
    pub round: u64,
    /// A shared-prefix holder: prefilled, never sampled, kept for forking.
    pub prefix_only: bool,
    /// The output text once a stop string or EOS cut it.
    pub finish_text: String,
}

/// What a round did to a session.
#[derive(Debug, PartialEq)]
pub(crate) enum Progress {
    Continue,
    Finished(FinishReason),
    /// The host dropped its stream.
    Disconnected,
}

impl Session {
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens the target has not cached yet (the prompt, then the last sampled token).
    pub fn target_feed(&self) -> &[u32] {
        &self.tokens[self.target_len..]
    }

    pub fn draft_feed(&self) -> &[u32] {
        &self.tokens[self.draft_len.min(self.tokens.len())..]
    }

    /// Draft tokens worth proposing: no more than the remaining budget allows.
    pub fn clamp_k(&self, k: usize) -> usize {
        let left = self.max_new_tokens.saturating_sub(self.generated().len());
        k.min(left.saturating_sub(1))
    }

    /// Seed of this round's draft sampling (deterministic per request seed).
    pub fn draft_seed(&self) -> u64 {
        self.params.seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(self.round + 1)
    }

    /// Cache lengths after a round that fed `k` drafts and accepted `verdict.accepted`:
    /// `(target_len, draft_len)`. Call before [`Session::emit`].
    pub fn lengths_after(
        &self,
        k: usize,
        used_draft: bool,
        verdict: &Verdict,
    ) -> (usize, Option<usize>) {
        let n = self.tokens.len();
        let target = n + verdict.accepted;
        let draft = (used_draft && k > 0).then(|| n + verdict.accepted.min(k - 1));
        (target, draft)
    }

    /// Appends the round's tokens, streaming each; stops at EOS, a stop string or the
    /// token budget (later tokens of the round are dropped).
    pub fn emit(&mut self, tokens: &[u32], tok: &Tokenizer) -> Progress {
        for &t in tokens {
            self.tokens.push(t);
            self.usage.generated_tokens += 1;
            crate::metrics::tokens_generated(1);
            let text = tok.decode(self.generated()).unwrap_or_default();
            if let Some(stop) = self.stop.push(t, &text) {
                let end = stop.text_end.max(self.emitted_text).min(text.len());
                let piece = text
                    .get(self.emitted_text..end)
                    .unwrap_or_default()
                    .to_string();
                if self.send(TokenEvent::Token { id: t, text: piece }).is_err() {
                    return Progress::Disconnected;
                }
                self.finish_text = text.get(..end).unwrap_or_default().to_string();
                return Progress::Finished(stop.reason);
            }
            let mut safe = self.stop.safe_text_len(&text);
            // Hold back an incomplete UTF-8 character (decoded as U+FFFD).
            if text[..safe].ends_with('\u{FFFD}') {
                safe -= '\u{FFFD}'.len_utf8();
            }
            let piece = if safe > self.emitted_text {
                let p = text[self.emitted_text..safe].to_string();
                self.emitted_text = safe;
                p
            } else {
                String::new()
            };
            if self.send(TokenEvent::Token { id: t, text: piece }).is_err() {
                return Progress::Disconnected;
            }
        }
        Progress::Continue
    }

    fn send(&self, ev: TokenEvent) -> Result<(), ()> {
        match self.tx.try_send(ev) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
            // The stream buffer is sized to the token budget; a full one means the host
            // is not reading, which is its choice: keep decoding.
            Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
        }
    }

    /// The final event.
    pub fn finished(&mut self, reason: FinishReason, tok: &Tokenizer) -> TokenEvent {
        self.usage.elapsed = self.started.elapsed();
        self.usage.prompt_tokens = self.prompt_len;
        let text = if self.finish_text.is_empty() {
            tok.decode(self.generated()).unwrap_or_default()
        } else {
            std::mem::take(&mut self.finish_text)
        };
        TokenEvent::Finished(Finished {
            reason,
            ids: self.generated().to_vec(),
            text,
            usage: self.usage.clone(),
        })
    }
}
