//! falconer: Falcon language models with speculative decoding, as cooperating actors
//! inside your tokio application.
//!
//! ```text
//! host ──generate──> Scheduler ──Propose──> DraftActor
//!                        │ ──Verify──> TargetShard 0 ──hidden──> … ──> TargetShard N-1
//!                        │ <──logits──────────────────────────────────────┘
//!                        │ ──Decide──> SamplerActor      (greedy match / rejection sampling)
//!                        │ ──Commit──> KvCacheManager     (roll back rejected drafts)
//! host <──TokenEvent stream──┘        Supervisor restarts a failed draft
//! ```
//!
//! - [`api`]: [`Runtime`], [`RuntimeBuilder`], requests, typed token streams, chat.
//! - actors: [`shard`], [`draft`], [`kv_manager`], [`sampler`], [`scheduler`],
//!   [`supervisor`]; each a thin shell around the engine's pure logic.
//! - [`metrics`]: what the runtime reports through the `metrics` facade.
//!
//! The model math, KV bookkeeping, sampling and acceptance rules live in
//! [`falconer_engine`], re-exported as [`engine`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), falconer::RuntimeError> {
//! use falconer::{GenerateRequest, Runtime, TokenEvent};
//! let rt = Runtime::builder()
//!     .target("examples/models/falcon-mini")
//!     .draft("examples/models/falcon-mini-draft")
//!     .build()
//!     .await?;
//! let mut stream = rt.generate(GenerateRequest::text("def main():").max_new_tokens(32)).await?;
//! while let Some(ev) = stream.next_event().await {
//!     match ev {
//!         TokenEvent::Token { text, .. } => print!("{text}"),
//!         TokenEvent::Finished(f) => println!("\n{:?}", f.usage.acceptance_rate()),
//!         TokenEvent::Error(e) => return Err(e),
//!     }
//! }
//! # Ok(()) }
//! ```

pub mod api;
pub mod draft;
pub mod error;
pub mod kv_manager;
pub mod metrics;
pub mod sampler;
pub mod scheduler;
pub mod shard;
pub mod supervisor;
mod util;

pub use falconer_engine as engine;

pub use api::builder::{Device, RuntimeBuilder};
pub use api::chat::ChatSession;
pub use api::events::{FinishReason, Finished, TokenEvent, Usage};
pub use api::request::{GenerateRequest, Prompt, Speculation};
pub use api::runtime::{ModelInfo, Runtime};
pub use api::stream::{GenerationStream, RequestId};
pub use error::RuntimeError;
pub use falconer_engine::WeightFormat;
pub use scheduler::{DraftPolicy, SchedulerStats};
