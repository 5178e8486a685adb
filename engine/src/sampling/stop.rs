//! Stop conditions for generation: EOS tokens, stop strings and a token
//! budget, plus how much generated text may be streamed without leaking the
//! start of a stop string that could still complete.
//!
//! The generated text passed in is assumed to grow append-only between calls
//! (the usual incremental detokenizer output); matches are searched only in
//! the region new text could complete, so each push costs O(new text).

use std::fmt;

/// Why generation ended. The strings match OpenAI-style `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// An end-of-sequence token was generated.
    Eos,
    /// A stop string appeared in the generated text.
    StopString,
    /// The `max_new_tokens` budget was used up.
    MaxNewTokens,
    /// The request was cancelled by the client.
    Cancelled,
    /// Generation failed.
    Error,
}

impl FinishReason {
    /// `"eos"`, `"stop"`, `"length"`, `"cancelled"` or `"error"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::StopString => "stop",
            Self::MaxNewTokens => "length",
            Self::Cancelled => "cancelled",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What ends a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopCriteria {
    /// Token ids that end generation; their text is not part of the output.
    pub eos_ids: Vec<u32>,
    /// Strings that end generation; the output is cut where one begins.
    /// Empty strings are ignored.
    pub stop_strings: Vec<String>,
    /// Maximum number of tokens to generate (tokens pushed to the checker).
    pub max_new_tokens: usize,
}

/// A decision to stop, with the output text to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop {
    /// Why generation ends.
    pub reason: FinishReason,
    /// Byte length of the generated text to keep (a char boundary):
    /// - `StopString`: up to where the earliest stop string begins;
    /// - `Eos`: the text length before the EOS token was pushed, so whatever
    ///   the EOS token decodes to (often `<|endoftext|>`) is not emitted;
    /// - `MaxNewTokens`: the whole text (the last token is within budget).
    pub text_end: usize,
}

/// Incremental stop detection; feed it every generated token.
#[derive(Debug, Clone)]
pub struct StopChecker {
    eos_ids: Vec<u32>,
    stop_strings: Vec<String>,
    max_stop_len: usize,
    max_new_tokens: usize,
    tokens: usize,
    prev_len: usize,
    stopped: Option<Stop>,
}

impl From<StopCriteria> for StopChecker {
    fn from(criteria: StopCriteria) -> Self {
        Self::new(criteria)
    }
}

/// Largest char boundary of `text` that is `<= at` (at most `text.len()`).
fn floor_boundary(text: &str, at: usize) -> usize {
    let mut i = at.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1; // Terminates: 0 is always a boundary.
    }
    i
}

impl StopChecker {
    /// A checker that has seen no tokens yet.
    pub fn new(criteria: StopCriteria) -> Self {
        // An empty stop string would match everywhere; treat it as absent.
        let stop_strings: Vec<String> = criteria
            .stop_strings
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        let max_stop_len = stop_strings.iter().map(String::len).max().unwrap_or(0);
        Self {
            eos_ids: criteria.eos_ids,
            stop_strings,
            max_stop_len,
            max_new_tokens: criteria.max_new_tokens,
            tokens: 0,
            prev_len: 0,
            stopped: None,
        }
    }

    /// Number of tokens pushed so far (the stopping push included).
    pub fn tokens_pushed(&self) -> usize {
        self.tokens
    }

    /// The stop decision, once one was made.
    pub fn stopped(&self) -> Option<Stop> {
        self.stopped
    }

    /// Records one generated token; `generated_text` is the full decoded
    /// generated text so far, this token included. Checks, in order: EOS,
    /// stop strings, the token budget. With `max_new_tokens == 0` the first
    /// push stops with `MaxNewTokens` and keeps no text of that token.
    /// After a stop, further pushes return the same stop and count nothing.
    pub fn push(&mut self, token: u32, generated_text: &str) -> Option<Stop> {
        if self.stopped.is_some() {
            return self.stopped;
        }
        self.tokens += 1;
        let len = generated_text.len();
        let stop = if self.eos_ids.contains(&token) {
            Some(Stop {
                reason: FinishReason::Eos,
                text_end: floor_boundary(generated_text, self.prev_len),
            })
        } else if let Some(pos) = self.find_stop_string(generated_text) {
            Some(Stop {
                reason: FinishReason::StopString,
                text_end: pos,
            })
        } else if self.tokens >= self.max_new_tokens {
            // Only `max_new_tokens == 0` gets here with tokens > budget.
            let text_end = if self.tokens > self.max_new_tokens {
                floor_boundary(generated_text, self.prev_len)
            } else {
                len
            };
            Some(Stop {
                reason: FinishReason::MaxNewTokens,
                text_end,
            })
        } else {
            None
        };
        self.prev_len = len;
        self.stopped = stop;
        stop
    }

    /// How many bytes of `generated_text` can be streamed now: everything
    /// except the longest suffix that is a proper prefix of some stop string
    /// (it may still complete), and never past a complete stop string or an
    /// earlier stop decision. Always a char boundary; never decreases as the
    /// text grows append-only.
    pub fn safe_text_len(&self, generated_text: &str) -> usize {
        let mut safe = generated_text.len();
        if let Some(stop) = self.stopped {
            safe = safe.min(stop.text_end);
        }
        if let Some(pos) = self.find_stop_string(generated_text) {
            return safe.min(pos);
        }
        let bytes = generated_text.as_bytes();
        for s in &self.stop_strings {
            let from = bytes.len().saturating_sub(s.len() - 1);
            // Ascending start = longest suffix first.
            let held = (from..bytes.len()).find(|&j| {
                generated_text.is_char_boundary(j) && s.as_bytes().starts_with(&bytes[j..])
            });
            if let Some(j) = held {
                safe = safe.min(j);
            }
        }
        safe
    }

    /// Byte offset of the earliest stop-string occurrence that could have
    /// been completed since the previous push.
    fn find_stop_string(&self, text: &str) -> Option<usize> {
        if self.stop_strings.is_empty() {
            return None;
        }
        // A match not found last time must end after `prev_len`, so it
        // starts at most `max_stop_len - 1` bytes before it.
        let start = floor_boundary(text, self.prev_len.saturating_sub(self.max_stop_len - 1));
        let window = &text[start..];
        self.stop_strings
            .iter()
            .filter_map(|s| window.find(s.as_str()))
            .min()
            .map(|p| start + p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(eos: &[u32], stops: &[&str], max: usize) -> StopChecker {
        StopChecker::new(StopCriteria {
            eos_ids: eos.to_vec(),
            stop_strings: stops.iter().map(|s| s.to_string()).collect(),
            max_new_tokens: max,
        })
    }

    #[test]
    fn finish_reason_strings() {
        assert_eq!(FinishReason::Eos.as_str(), "eos");
        assert_eq!(FinishReason::StopString.as_str(), "stop");
        assert_eq!(FinishReason::MaxNewTokens.as_str(), "length");
        assert_eq!(FinishReason::Cancelled.as_str(), "cancelled");
        assert_eq!(FinishReason::Error.to_string(), "error");
    }

    #[test]
    fn eos_excludes_its_text() {
        let mut c = checker(&[11], &[], 100);
        assert_eq!(c.push(5, "Hello"), None);
        let stop = c
            .push(11, "Hello<|endoftext|>")
            .map(|s| (s.reason, s.text_end));
        assert_eq!(stop, Some((FinishReason::Eos, 5)));
        // EOS that decodes to nothing: same cut.
        let mut c = checker(&[11], &[], 100);
        c.push(5, "Hi");
        assert_eq!(c.push(11, "Hi").map(|s| s.text_end), Some(2));
        assert_eq!(c.tokens_pushed(), 2);
    }

    #[test]
    fn stop_string_across_tokens_cuts_before_it() {
        let mut c = checker(&[], &["\nUser:"], 100);
        assert_eq!(c.push(1, "Sure.\nUs"), None);
        let stop = c.push(2, "Sure.\nUser: next").unwrap_or(Stop {
            reason: FinishReason::Error,
            text_end: 0,
        });
        assert_eq!(stop.reason, FinishReason::StopString);
        assert_eq!(stop.text_end, 5);
    }

    #[test]
    fn earliest_stop_string_wins() {
        let mut c = checker(&[], &["cd", "bcdef", "b"], 100);
        let stop = c.push(1, "abcdef").map(|s| s.text_end);
        assert_eq!(stop, Some(1));
    }

    #[test]
    fn max_new_tokens_keeps_all_text_and_priority() {
        let mut c = checker(&[9], &["x"], 2);
        assert_eq!(c.push(1, "a"), None);
        let s = c.push(2, "ab").map(|s| (s.reason, s.text_end));
        assert_eq!(s, Some((FinishReason::MaxNewTokens, 2)));
        // Budget reached by a stop-string token: the stop string wins.
        let mut c = checker(&[9], &["x"], 1);
        let s = c.push(2, "ax").map(|s| (s.reason, s.text_end));
        assert_eq!(s, Some((FinishReason::StopString, 1)));
        // Budget reached by EOS: EOS wins.
        let mut c = checker(&[9], &["x"], 1);
        let s = c.push(9, "</s>").map(|s| (s.reason, s.text_end));
        assert_eq!(s, Some((FinishReason::Eos, 0)));
    }

    #[test]
    fn zero_budget_keeps_nothing() {
        let mut c = checker(&[], &[], 0);
        let s = c.push(1, "abc").map(|s| (s.reason, s.text_end));
        assert_eq!(s, Some((FinishReason::MaxNewTokens, 0)));
    }

    #[test]
    fn pushes_after_stop_repeat_the_decision() {
        let mut c = checker(&[0], &[], 10);
        let first = c.push(0, "");
        assert!(first.is_some());
        assert_eq!(c.push(3, "more"), first);
        assert_eq!(c.tokens_pushed(), 1);
        assert_eq!(c.stopped(), first);
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let mut c = checker(&[], &[""], 10);
        assert_eq!(c.push(1, "abc"), None);
        assert_eq!(c.safe_text_len("abc"), 3);
    }

    #[test]
    fn safe_text_len_holds_back_possible_prefixes() {
        let c = checker(&[], &["\nUser:", "###"], 10);
        assert_eq!(c.safe_text_len("Hello"), 5);
        assert_eq!(c.safe_text_len("Hello\n"), 5);
        assert_eq!(c.safe_text_len("Hello\nUse"), 5);
        assert_eq!(c.safe_text_len("Hello\nUsa"), 9);
        assert_eq!(c.safe_text_len("a##"), 1);
        // A complete stop string: safe up to where it begins.
        assert_eq!(c.safe_text_len("ok\nUser: hi"), 2);
        assert_eq!(c.safe_text_len(""), 0);
    }

    #[test]
    fn safe_text_len_respects_char_boundaries() {
        // The stop string starts with a 2-byte char; a text ending in the
        // first byte of a different 2-byte char cannot be a &str, so check
        // a text ending in a full matching char.
        let c = checker(&[], &["éx"], 10);
        assert_eq!(c.safe_text_len("caf\u{e9}"), 3);
        assert_eq!(c.safe_text_len("caf\u{e8}"), 5);
        let c = checker(&[], &["\u{1F600}!"], 10);
        let t = "hi \u{1F600}";
        assert_eq!(c.safe_text_len(t), 3);
        assert!(t.is_char_boundary(c.safe_text_len(t)));
    }

    #[test]
    fn safe_text_len_after_stop_is_capped() {
        let mut c = checker(&[7], &[], 10);
        c.push(1, "abc");
        c.push(7, "abc</s>");
        assert_eq!(c.safe_text_len("abc</s>"), 3);
    }

    #[test]
    fn multibyte_eos_cut_is_a_boundary() {
        let mut c = checker(&[7], &[], 10);
        c.push(1, "\u{e9}");
        let s = c.push(7, "\u{e9}").map(|s| s.text_end);
        assert_eq!(s, Some(2));
        assert_eq!(floor_boundary("\u{e9}", 1), 0);
    }
}
