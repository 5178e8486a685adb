//! The runtime's metrics, through the `metrics` crate facade: install any recorder
//! (e.g. `metrics-exporter-prometheus`) in the host to export them.
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `falconer_tokens_generated_total` | counter | tokens streamed to hosts |
//! | `falconer_target_passes_total` | counter | target forward passes (batched) |
//! | `falconer_draft_tokens_proposed_total` / `_accepted_total` | counter | speculative drafts |
//! | `falconer_acceptance_rate` | histogram | per speculative round |
//! | `falconer_draft_length` | histogram | k chosen per session round |
//! | `falconer_tokens_per_target_pass` | histogram | per session round |
//! | `falconer_step_seconds{actor}` | histogram | one step of `target_shard`, `draft`, `sampler`, `kv_cache_manager` (a reservation) and `scheduler_round` (a whole round) |
//! | `falconer_kv_blocks_used{model}` | gauge | KV blocks in use, target and draft |
//! | `falconer_queue_depth` | gauge | requests waiting for KV space |
//! | `falconer_active_sessions` | gauge | sessions being decoded |
//! | `falconer_draft_restarts_total` | counter | draft actor restarts |
//! | `falconer_preemptions_total` | counter | sessions whose KV was freed to unblock others |

use std::time::Duration;

pub(crate) fn tokens_generated(n: usize) {
    metrics::counter!("falconer_tokens_generated_total").increment(n as u64);
}

pub(crate) fn target_pass() {
    metrics::counter!("falconer_target_passes_total").increment(1);
}

pub(crate) fn speculative_round(k: usize, accepted: usize, emitted: usize) {
    metrics::counter!("falconer_draft_tokens_proposed_total").increment(k as u64);
    metrics::counter!("falconer_draft_tokens_accepted_total").increment(accepted as u64);
    metrics::histogram!("falconer_draft_length").record(k as f64);
    metrics::histogram!("falconer_tokens_per_target_pass").record(emitted as f64);
    if k > 0 {
        metrics::histogram!("falconer_acceptance_rate").record(accepted as f64 / k as f64);
    }
}

pub(crate) fn step_latency(actor: &'static str, d: Duration) {
    metrics::histogram!("falconer_step_seconds", "actor" => actor).record(d.as_secs_f64());
}

pub(crate) fn kv_blocks_used(model: &'static str, n: usize) {
    metrics::gauge!("falconer_kv_blocks_used", "model" => model).set(n as f64);
}

pub(crate) fn queue_depth(n: usize) {
    metrics::gauge!("falconer_queue_depth").set(n as f64);
}

pub(crate) fn active_sessions(n: usize) {
    metrics::gauge!("falconer_active_sessions").set(n as f64);
}

pub(crate) fn draft_restart() {
    metrics::counter!("falconer_draft_restarts_total").increment(1);
}

pub(crate) fn preemption() {
    metrics::counter!("falconer_preemptions_total").increment(1);
}
