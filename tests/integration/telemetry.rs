//! The runtime's metrics reach an installed `metrics` recorder: token and pass counters,
//! speculative figures consistent with the requests' usage, per-actor step latencies,
//! KV, queue and session gauges.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use falconer::{GenerateRequest, Runtime, Speculation};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

use crate::common::{fixtures, reference, tokio_rt};

/// Per metric (name plus labels): counter total, last gauge value, or number of
/// histogram samples.
type Store = Arc<Mutex<BTreeMap<String, f64>>>;

struct Cell {
    key: String,
    store: Store,
}

impl Cell {
    fn update(&self, f: impl FnOnce(&mut f64)) {
        if let Ok(mut m) = self.store.lock() {
            f(m.entry(self.key.clone()).or_insert(0.0));
        }
    }
}

impl CounterFn for Cell {
    fn increment(&self, v: u64) {
        self.update(|x| *x += v as f64);
    }
    fn absolute(&self, v: u64) {
        self.update(|x| *x = v as f64);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, v: f64) {
        self.update(|x| *x += v);
    }
    fn decrement(&self, v: f64) {
        self.update(|x| *x -= v);
    }
    fn set(&self, v: f64) {
        self.update(|x| *x = v);
    }
}

impl HistogramFn for Cell {
    fn record(&self, _: f64) {
        self.update(|x| *x += 1.0);
    }
}

struct TestRecorder(Store);

impl TestRecorder {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        let mut name = key.name().to_string();
        for l in key.labels() {
            name += &format!("{{{}={}}}", l.key(), l.value());
        }
        Arc::new(Cell {
            key: name,
            store: self.0.clone(),
        })
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.cell(key))
    }
}

/// The process-wide recorder (other tests in this binary add to it too, so the
/// assertions below only use differences and presence).
fn store() -> Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE
        .get_or_init(|| {
            let s = Store::default();
            metrics::set_global_recorder(TestRecorder(s.clone())).expect("no other recorder");
            s
        })
        .clone()
}

fn snapshot(s: &Store) -> BTreeMap<String, f64> {
    s.lock().map(|m| m.clone()).unwrap_or_default()
}

#[test]
fn metrics_reach_the_recorder() {
    let s = store();
    let before = snapshot(&s);
    let name = "new_arch_gqa_sharded";
    let r = reference(name);
    let f = tokio_rt().block_on(async {
        let rt = Runtime::builder()
            .target(fixtures().join(name))
            .draft(fixtures().join("falcon7b_mqa"))
            .build()
            .await
            .unwrap();
        let req = GenerateRequest::ids(r.prompt_ids.clone())
            .max_new_tokens(24)
            .eos(vec![])
            .speculation(Speculation::DraftModel)
            .draft_len(3);
        rt.generate(req).await.unwrap().collect().await.unwrap()
    });
    let after = snapshot(&s);
    let grew =
        |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    assert!(grew("falconer_tokens_generated_total") >= 24.0, "{after:?}");
    assert!(grew("falconer_target_passes_total") >= f.usage.target_passes as f64);
    assert!(grew("falconer_draft_tokens_proposed_total") >= f.usage.draft_tokens_proposed as f64);
    assert!(f.usage.draft_tokens_proposed > 0);
    assert!(grew("falconer_draft_length") > 0.0 && grew("falconer_tokens_per_target_pass") > 0.0);
    for actor in [
        "target_shard",
        "draft",
        "sampler",
        "kv_cache_manager",
        "scheduler_round",
    ] {
        assert!(
            grew(&format!("falconer_step_seconds{{actor={actor}}}")) > 0.0,
            "no step latency for {actor}"
        );
    }
    for gauge in [
        "falconer_kv_blocks_used{model=target}",
        "falconer_kv_blocks_used{model=draft}",
        "falconer_queue_depth",
        "falconer_active_sessions",
    ] {
        assert!(after.contains_key(gauge), "gauge {gauge} never set");
    }
}
