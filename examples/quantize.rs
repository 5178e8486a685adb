//! Writes a model directory with its decoder-layer weights stored as int8 or int4, so
//! that a large model is read, not quantized, at each start (falconer's own layout:
//! `falconer_engine::quant::save_quantized`).
//!
//! ```text
//! cargo run --release --example quantize -- --model DIR --weights int4 --out DIR-int4
//! cargo run --release --example generate -- --model DIR-int4 --prompt "def f(x):"
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use falconer::engine::quant::save_quantized;
use falconer::engine::{ModelDir, ProgressFn};
use falconer::WeightFormat;

#[derive(Parser, Debug)]
#[command(about = "Store a Falcon checkpoint's layer weights as int8 or int4")]
struct Args {
    /// Source model directory (HF layout, float weights).
    #[arg(long)]
    model: PathBuf,
    /// int8, int4 or int4:g<group>.
    #[arg(long, default_value = "int4")]
    weights: WeightFormat,
    /// Destination directory (created if absent).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let t = Instant::now();
    let bar = ProgressFn::stderr_bar("quantizing", 1 << 30);
    let saved = save_quantized(
        &ModelDir::new(&args.model),
        &args.out,
        args.weights,
        Some(&bar),
    )?;
    println!(
        "{} -> {} ({}): {} file(s), {:.1} MiB of tensors -> {:.1} MiB in {:.1} s",
        args.model.display(),
        args.out.display(),
        args.weights,
        saved.files,
        saved.bytes_in as f64 / (1u64 << 20) as f64,
        saved.bytes_out as f64 / (1u64 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
