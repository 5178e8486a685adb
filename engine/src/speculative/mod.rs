//! The pure math of speculative decoding ("assisted generation").
//!
//! A cheap draft model proposes `k` tokens autoregressively; the target model
//! scores all of them in one forward pass, which yields its distributions
//! `p_0..p_k` for the positions after each draft prefix. Verification then
//! keeps a prefix of the drafts and adds one target token, so every target
//! pass emits between 1 and `k + 1` tokens:
//!
//! - Greedy ([`accept_greedy`]): accept draft `i` while it equals the
//!   target's argmax; then emit the target's argmax. The output is identical
//!   to plain greedy decoding with the target.
//! - Sampling ([`accept_sampling`]): accept draft `x_i ~ q_i` with
//!   probability `min(1, p_i(x_i) / q_i(x_i))`; at the first rejection emit a
//!   sample from `norm(max(0, p_i - q_i))`; if all are accepted emit a bonus
//!   sample from `p_k`. Each emitted token is then distributed exactly as a
//!   sample from the target, whatever the draft (proved in both papers).
//!
//! With per-token acceptance rate `a` and draft/target cost ratio `c`, a
//! round emits `(1 - a^(k+1)) / (1 - a)` tokens in expectation for a cost of
//! `k c + 1` target passes; [`DraftLengthPolicy`] picks `k` from that. The
//! drafts can also come from the context itself ([`prompt_lookup`]).
//!
//! References:
//! - Y. Leviathan, M. Kalman, Y. Matias, "Fast Inference from Transformers
//!   via Speculative Decoding", ICML 2023, arXiv:2211.17192.
//! - C. Chen, S. Borgeaud, G. Irving, J.-B. Lespiau, L. Sifre, J. Jumper,
//!   "Accelerating Large Language Model Decoding with Speculative
//!   Sampling", 2023, arXiv:2302.01318.

pub mod acceptance;
pub mod lookup;
pub mod policy;

pub use acceptance::{
    accept_greedy, accept_greedy_tokens, accept_sampling, RowKind, SpeculativeError, Verdict,
};
pub use lookup::prompt_lookup;
pub use policy::{
    expected_tokens_per_pass, speedup_bound, AdaptiveConfig, AdaptivePolicy, DraftLengthPolicy,
};
