//! What a host asks for: a prompt, how to sample, when to stop, how to speculate.

use falconer_engine::sampling::SamplingParams;

/// The prompt of a request: text (tokenised by the runtime) or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// How a request proposes tokens for the target to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Speculation {
    /// The runtime's default: the draft model if one is loaded, else plain decoding.
    #[default]
    Auto,
    /// Plain decoding: one target pass per token.
    Off,
    /// Draft-model proposals (plain decoding if the runtime has no draft).
    DraftModel,
    /// Prompt lookup: propose the continuation of an earlier match of the last n-gram.
    PromptLookup,
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Strings that end the reply (not included in the output).
    pub stop: Vec<String>,
    /// End-of-sequence ids; `None` means the model's own.
    pub eos_token_ids: Option<Vec<u32>>,
    pub speculation: Speculation,
    /// A fixed draft length for this request; `None` uses the runtime's policy.
    pub draft_len: Option<usize>,
}

impl GenerateRequest {
    fn with_prompt(prompt: Prompt) -> Self {
        GenerateRequest {
            prompt,
            sampling: SamplingParams::greedy(),
            max_new_tokens: 64,
            stop: Vec::new(),
            eos_token_ids: None,
            speculation: Speculation::Auto,
            draft_len: None,
        }
    }

    /// A greedy request for `text`, 64 new tokens.
    pub fn text(text: impl Into<String>) -> Self {
        Self::with_prompt(Prompt::Text(text.into()))
    }

    /// A greedy request for token ids, 64 new tokens.
    pub fn ids(ids: impl Into<Vec<u32>>) -> Self {
        Self::with_prompt(Prompt::Ids(ids.into()))
    }

    pub fn max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }

    pub fn sampling(mut self, params: SamplingParams) -> Self {
        self.sampling = params;
        self
    }

    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.stop.push(s.into());
        self
    }

    pub fn eos(mut self, ids: Vec<u32>) -> Self {
        self.eos_token_ids = Some(ids);
        self
    }

    pub fn speculation(mut self, s: Speculation) -> Self {
        self.speculation = s;
        self
    }

    pub fn draft_len(mut self, k: usize) -> Self {
        self.draft_len = Some(k);
        self
    }
}
