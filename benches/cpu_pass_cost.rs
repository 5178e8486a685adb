//! What a forward pass over t new tokens costs on the CPU backend, against one token:
//! the verify-pass cost that bounds speculative decoding's speed-up (the bound
//! E / (k*c + 1) assumes a pass over k+1 tokens costs one decode step).
//!
//! `cargo bench --bench cpu_pass_cost [-- MODEL_DIR]` (default: the shipped target and
//! draft). Each repetition times t = 1..8 in turn after a 64-token prompt, truncating
//! back after each pass; the table gives medians over 60 repetitions.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use falconer_engine::checkpoint::ModelDir;
use falconer_engine::{CpuBackend, Falcon, LoadOptions, ModelRunner, SeqWork};

const PROMPT: usize = 64;
const MAX_T: usize = 8;
const REPS: usize = 60;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds of a pass over t = 1..=MAX_T tokens.
fn pass_costs(dir: &Path) -> Result<Vec<f64>> {
    let opts = LoadOptions {
        kv_blocks: 256,
        block_size: 16,
        ..LoadOptions::default()
    };
    let model = Falcon::load(&ModelDir::new(dir), Arc::new(CpuBackend::new()), &opts)?;
    let vocab = model.config().vocab_size as u32;
    let mut runner = ModelRunner::new(model);
    runner.add_sequence(1)?;
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| i * 37 % vocab).collect();
    runner.forward(&[SeqWork {
        seq: 1,
        tokens: &prompt,
        all_logits: false,
    }])?;
    let mut times = vec![Vec::new(); MAX_T];
    for rep in 0..REPS {
        for (t, slot) in times.iter_mut().enumerate().map(|(i, s)| (i + 1, s)) {
            let tokens: Vec<u32> = (0..t)
                .map(|i| ((rep * 13 + i * 7) as u32) % vocab)
                .collect();
            let start = Instant::now();
            runner.forward(&[SeqWork {
                seq: 1,
                tokens: &tokens,
                all_logits: t > 1,
            }])?;
            slot.push(start.elapsed().as_secs_f64() * 1e3);
            runner.truncate(1, PROMPT)?;
        }
    }
    Ok(times.into_iter().map(median).collect())
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/models");
    let dirs: Vec<PathBuf> = match std::env::args().nth(1).filter(|a| !a.starts_with('-')) {
        Some(d) => vec![d.into()],
        None => vec![root.join("falcon-mini"), root.join("falcon-mini-draft")],
    };
    println!("CPU pass cost by new tokens t (median of {REPS}, after a {PROMPT}-token prompt)");
    for dir in dirs {
        let ms = pass_costs(&dir)?;
        println!("\n{}", dir.display());
        println!("| t | ms | x one token |");
        println!("|---|---|---|");
        for (i, m) in ms.iter().enumerate() {
            println!("| {} | {m:.3} | {:.2}x |", i + 1, m / ms[0]);
        }
    }
    Ok(())
}
