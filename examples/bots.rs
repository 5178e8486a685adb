//! Several bots talking at once through one runtime.
//!
//! ```text
//! cargo run --release --example bots -- --pairs 3 --turns 4
//! ```
//!
//! Each pair is two chat sessions with their own system prompts; one bot's reply is the
//! other's next user turn. All pairs run concurrently as tokio tasks sharing one
//! `Runtime`, so their target passes are batched together by the scheduler. Each reply
//! prints whole, tagged with its bot; a summary of throughput and acceptance ends the run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use falconer::{Runtime, Speculation, Usage};

#[derive(Parser, Debug)]
#[command(about = "Several chat bots talking concurrently through one falconer runtime")]
struct Args {
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/models/falcon-mini"))]
    model: PathBuf,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/models/falcon-mini-draft"))]
    draft: PathBuf,
    /// Conversations running at once (two bots each).
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Replies per bot.
    #[arg(long, default_value_t = 3)]
    turns: usize,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// How the target's layer weights are held: checkpoint, int8, int4 or int4:g<group>.
    #[arg(long, default_value = "checkpoint")]
    weights: falconer::WeightFormat,
}

const PERSONAS: &[(&str, &str)] = &[
    (
        "Ada",
        "You are Ada, who answers with short Python functions.",
    ),
    (
        "Guido",
        "You are Guido, who reviews Python code and suggests one improvement.",
    ),
    (
        "Grace",
        "You are Grace, who explains what a piece of code does.",
    ),
    ("Linus", "You are Linus, who asks for tests."),
];

const OPENERS: &[&str] = &[
    "Write a function that checks whether a string is a palindrome.",
    "How do I read a JSON file into a dict?",
    "Show me a class for a simple queue.",
    "What does enumerate do?",
];

/// One conversation; returns the usage of every reply.
async fn conversation(rt: Runtime, pair: usize, args: &Args) -> Result<Vec<Usage>> {
    let (na, sa) = PERSONAS[(2 * pair) % PERSONAS.len()];
    let (nb, sb) = PERSONAS[(2 * pair + 1) % PERSONAS.len()];
    let mut bots = [
        (
            na,
            rt.chat()
                .system(sa)
                .max_new_tokens(args.max_new_tokens)
                .speculation(Speculation::Auto),
        ),
        (
            nb,
            rt.chat()
                .system(sb)
                .max_new_tokens(args.max_new_tokens)
                .speculation(Speculation::Auto),
        ),
    ];
    let mut message = OPENERS[pair % OPENERS.len()].to_string();
    println!("[pair {pair}] {nb}: {message}");
    let mut usages = Vec::new();
    for turn in 0..2 * args.turns {
        let (name, chat) = &mut bots[turn % 2];
        let f = chat.reply(&message, |_| {}).await?;
        let text = f.text.trim().to_string();
        let acc = f
            .usage
            .acceptance_rate()
            .map_or_else(|| "-".into(), |a| format!("{:.0}%", a * 100.0));
        println!(
            "[pair {pair}] {name}: {}\n           ({} tokens, {:.1} tokens/s, acceptance {acc})",
            text.replace('\n', "\n           "),
            f.usage.generated_tokens,
            f.usage.tokens_per_second()
        );
        usages.push(f.usage);
        message = if text.is_empty() {
            "Go on.".to_string()
        } else {
            text
        };
    }
    Ok(usages)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = std::sync::Arc::new(Args::parse());
    let rt = Runtime::builder()
        .target(&args.model)
        .draft(&args.draft)
        .weights(args.weights)
        .device(args.device.parse()?)
        .build()
        .await?;
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.pairs)
        .map(|pair| {
            let (rt, args) = (rt.clone(), args.clone());
            tokio::spawn(async move { conversation(rt, pair, &args).await })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    let tokens: usize = all.iter().map(|u| u.generated_tokens).sum();
    let proposed: usize = all.iter().map(|u| u.draft_tokens_proposed).sum();
    let accepted: usize = all.iter().map(|u| u.draft_tokens_accepted).sum();
    let passes: usize = all.iter().map(|u| u.target_passes).sum();
    println!(
        "\n{} bots, {} replies, {tokens} tokens in {secs:.1}s: {:.1} tokens/s in all; acceptance {:.0}%, {:.2} tokens per target pass (per session)",
        2 * args.pairs,
        all.len(),
        tokens as f64 / secs,
        100.0 * accepted as f64 / proposed.max(1) as f64,
        tokens as f64 / passes.max(1) as f64
    );
    let st = rt.stats().await?;
    println!(
        "runtime after the run: {} active sessions, {} KV blocks in use",
        st.active, st.kv.target_used
    );
    Ok(())
}
