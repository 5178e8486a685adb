//! The stream a host reads a generation from. Dropping it cancels the request.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use ractor::ActorRef;
use tokio::sync::mpsc;

use super::events::{Finished, TokenEvent};
use crate::error::RuntimeError;
use crate::scheduler::SchedulerMsg;

/// Identifies a request within one runtime.
pub type RequestId = u64;

/// Token events of one request, in order; ends after `Finished` or `Error`.
#[derive(Debug)]
pub struct GenerationStream {
    id: RequestId,
    rx: mpsc::Receiver<TokenEvent>,
    scheduler: ActorRef<SchedulerMsg>,
    done: bool,
}

impl GenerationStream {
    pub(crate) fn new(
        id: RequestId,
        rx: mpsc::Receiver<TokenEvent>,
        scheduler: ActorRef<SchedulerMsg>,
    ) -> Self {
        GenerationStream {
            id,
            rx,
            scheduler,
            done: false,
        }
    }

    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Stops the request; its KV blocks are freed and the stream ends with
    /// `Finished { reason: Cancelled }`.
    pub fn cancel(&self) {
        let _ = self.scheduler.cast(SchedulerMsg::Cancel(self.id));
    }

    /// The next event, `None` after the last.
    pub async fn next_event(&mut self) -> Option<TokenEvent> {
        if self.done {
            return None;
        }
        let ev = self.rx.recv().await;
        if matches!(
            ev,
            None | Some(TokenEvent::Finished(_) | TokenEvent::Error(_))
        ) {
            self.done = true;
        }
        ev
    }

    /// Reads the whole stream; the request's failure is the error.
    pub async fn collect(mut self) -> Result<Finished, RuntimeError> {
        while let Some(ev) = self.next_event().await {
            match ev {
                TokenEvent::Token { .. } => {}
                TokenEvent::Finished(f) => return Ok(f),
                TokenEvent::Error(e) => return Err(e),
            }
        }
        Err(RuntimeError::ShutDown)
    }
}

impl Stream for GenerationStream {
    type Item = TokenEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TokenEvent>> {
        if self.done {
            return Poll::Ready(None);
        }
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(ev) = &polled {
            if matches!(
                ev,
                None | Some(TokenEvent::Finished(_) | TokenEvent::Error(_))
            ) {
                self.done = true;
            }
        }
        polled
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        if !self.done {
            self.cancel();
        }
    }
}
