//! The public API a Rust service uses: build a [`Runtime`], send requests, read typed
//! token streams, hold chat sessions.

pub mod builder;
pub mod chat;
pub mod events;
pub mod request;
pub mod runtime;
pub mod stream;
