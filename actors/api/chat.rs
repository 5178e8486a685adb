//! Chat sessions: history in the model's chat format, one reply per user turn.

use falconer_engine::chat::{ChatFormat, Message};
use falconer_engine::sampling::SamplingParams;

use super::events::{Finished, TokenEvent};
use super::request::{GenerateRequest, Speculation};
use super::runtime::Runtime;
use crate::error::RuntimeError;

/// A conversation with history.
#[derive(Debug, Clone)]
pub struct ChatSession {
    runtime: Runtime,
    format: ChatFormat,
    history: Vec<Message>,
    sampling: SamplingParams,
    max_new_tokens: usize,
    speculation: Speculation,
}

impl ChatSession {
    pub(crate) fn new(runtime: Runtime, format: ChatFormat) -> Self {
        ChatSession {
            runtime,
            format,
            history: Vec::new(),
            sampling: SamplingParams::greedy(),
            max_new_tokens: 256,
            speculation: Speculation::Auto,
        }
    }

    pub fn system(mut self, text: impl Into<String>) -> Self {
        self.history
            .retain(|m| m.role != falconer_engine::chat::Role::System);
        self.history.insert(0, Message::system(text));
        self
    }

    pub fn format(mut self, format: ChatFormat) -> Self {
        self.format = format;
        self
    }

    pub fn sampling(mut self, p: SamplingParams) -> Self {
        self.sampling = p;
        self
    }

    pub fn max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }

    pub fn speculation(mut self, s: Speculation) -> Self {
        self.speculation = s;
        self
    }

    pub fn history(&self) -> &[Message] {
        &self.history
    }

    /// Sends a user turn; `on_text` sees the reply as it streams. The reply joins the
    /// history; on error the history is left as it was.
    pub async fn reply(
        &mut self,
        user: &str,
        mut on_text: impl FnMut(&str),
    ) -> Result<Finished, RuntimeError> {
        self.history.push(Message::user(user));
        let result = async {
            let prompt = self.format.render(&self.history)?;
            let mut req = GenerateRequest::text(prompt)
                .max_new_tokens(self.max_new_tokens)
                .sampling(self.sampling)
                .speculation(self.speculation);
            req.stop = self.format.stop_strings();
            let mut stream = self.runtime.generate(req).await?;
            while let Some(ev) = stream.next_event().await {
                match ev {
                    TokenEvent::Token { text, .. } => on_text(&text),
                    TokenEvent::Finished(f) => return Ok(f),
                    TokenEvent::Error(e) => return Err(e),
                }
            }
            Err(RuntimeError::ShutDown)
        }
        .await;
        match result {
            Ok(f) => {
                self.history.push(Message::assistant(f.text.trim()));
                Ok(f)
            }
            Err(e) => {
                self.history.pop();
                Err(e)
            }
        }
    }
}
