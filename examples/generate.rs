//! Generate text with a Falcon checkpoint, optionally with speculative decoding.
//!
//! ```text
//! cargo run --release --example generate -- --prompt "def fibonacci(n):"
//! cargo run --release --example generate -- --draft examples/models/falcon-mini-draft --prompt-ids 1,2,3 --json
//! ```
//!
//! Streams text to stdout; `--json` prints one line per token (`{"id": .., "text": ..}`)
//! and, when speculating, a final line with the acceptance figures. Outside checks drive
//! the model through this interface: keep it stable.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use falconer::engine::sampling::SamplingParams;
use falconer::{DraftPolicy, GenerateRequest, Runtime, Speculation, TokenEvent, WeightFormat};

#[derive(Parser, Debug)]
#[command(about = "Generate with a Falcon model (speculative decoding optional)")]
struct Args {
    /// Target model directory (HF layout).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/models/falcon-mini"))]
    model: PathBuf,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature (sampling only when given and > 0).
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Greedy decoding (the default unless --temperature is given).
    #[arg(long)]
    greedy: bool,
    /// Draft model directory for speculative decoding.
    #[arg(long)]
    draft: Option<PathBuf>,
    /// Fixed draft length (adaptive when absent).
    #[arg(long)]
    draft_len: Option<usize>,
    /// Prompt-lookup speculation (no draft model).
    #[arg(long)]
    prompt_lookup: bool,
    /// Split the target over this many shard actors.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// How the target's layer weights are held: checkpoint, int8, int4 or int4:g<group>.
    #[arg(long, default_value = "checkpoint")]
    weights: WeightFormat,
    /// The same for the draft model.
    #[arg(long, default_value = "checkpoint")]
    draft_weights: WeightFormat,
    /// One JSON line per token.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut builder = Runtime::builder()
        .target(&args.model)
        .shards(args.shards)
        .weights(args.weights)
        .draft_weights(args.draft_weights)
        .device(args.device.parse()?);
    if let Some(d) = &args.draft {
        builder = builder.draft(d);
    }
    if let Some(k) = args.draft_len {
        builder = builder.draft_policy(DraftPolicy::Fixed(k));
    }
    let rt = builder.build().await?;

    let mut req = match (&args.prompt, &args.prompt_ids) {
        (Some(p), _) => GenerateRequest::text(p.clone()),
        (None, Some(ids)) => GenerateRequest::ids(ids.clone()),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    }
    .max_new_tokens(args.max_new_tokens);
    let sampling = match args.temperature {
        Some(t) if t > 0.0 && !args.greedy => SamplingParams {
            temperature: t,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
        _ => SamplingParams {
            repetition_penalty: args.repetition_penalty,
            ..SamplingParams::greedy()
        },
    };
    req = req.sampling(sampling);
    let speculating = args.draft.is_some() || args.prompt_lookup;
    if args.draft_len.is_some() && !speculating {
        bail!("--draft-len needs --draft DIR or --prompt-lookup");
    }
    req = req.speculation(if args.prompt_lookup {
        Speculation::PromptLookup
    } else if args.draft.is_some() {
        Speculation::DraftModel
    } else {
        Speculation::Off
    });

    let mut stream = rt.generate(req).await?;
    let mut out = std::io::stdout().lock();
    while let Some(ev) = stream.next_event().await {
        match ev {
            TokenEvent::Token { id, text } => {
                if args.json {
                    writeln!(out, "{}", serde_json::json!({ "id": id, "text": text }))?;
                } else {
                    write!(out, "{text}")?;
                    out.flush()?;
                }
            }
            TokenEvent::Finished(f) => {
                let u = &f.usage;
                if args.json {
                    if speculating {
                        let summary = serde_json::json!({
                            "finish_reason": f.reason.as_str(),
                            "generated_tokens": u.generated_tokens,
                            "target_passes": u.target_passes,
                            "draft_tokens_proposed": u.draft_tokens_proposed,
                            "draft_tokens_accepted": u.draft_tokens_accepted,
                            "acceptance_rate": u.acceptance_rate(),
                            "tokens_per_target_pass": u.tokens_per_pass(),
                            "tokens_per_second": u.tokens_per_second(),
                        });
                        writeln!(out, "{summary}")?;
                    }
                } else {
                    writeln!(out)?;
                    let acc = u
                        .acceptance_rate()
                        .map_or_else(|| "-".to_string(), |a| format!("{:.1}%", a * 100.0));
                    eprintln!(
                        "[{}] {} tokens, {:.1} tokens/s, {:.2} tokens/target pass, acceptance {acc} ({} backend, {} weights: {:.1} MiB)",
                        f.reason.as_str(),
                        u.generated_tokens,
                        u.tokens_per_second(),
                        u.tokens_per_pass(),
                        rt.info().backend,
                        rt.info().weights,
                        rt.info().weight_bytes as f64 / (1u64 << 20) as f64,
                    );
                }
            }
            TokenEvent::Error(e) => return Err(e.into()),
        }
    }
    Ok(())
}
