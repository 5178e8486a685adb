//! Interactive chat in the Falcon chat format, with speculative decoding.
//!
//! ```text
//! cargo run --release --example chat
//! echo "Write a function that reverses a list." | cargo run --release --example chat
//! ```
//!
//! Each line on stdin is a user turn; the reply streams to stdout, then one line with
//! its tokens/s, draft acceptance and tokens per target pass. `/reset` clears the
//! history, `/quit` (or end of input) leaves. The shipped pair was trained on Python
//! source, not on dialogue: expect code-flavoured replies.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use falconer::engine::sampling::SamplingParams;
use falconer::{ChatSession, Runtime, Speculation};

#[derive(Parser, Debug)]
#[command(about = "Chat with a Falcon model (Falcon chat format, multi-turn)")]
struct Args {
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/models/falcon-mini"))]
    model: PathBuf,
    /// Draft model for speculative decoding.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/models/falcon-mini-draft"))]
    draft: PathBuf,
    /// Decode without the draft model.
    #[arg(long)]
    no_draft: bool,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature (greedy when absent).
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// How the target's layer weights are held: checkpoint, int8, int4 or int4:g<group>.
    #[arg(long, default_value = "checkpoint")]
    weights: falconer::WeightFormat,
}

fn session(rt: &Runtime, args: &Args) -> ChatSession {
    let sampling = match args.temperature {
        Some(t) if t > 0.0 => SamplingParams {
            temperature: t,
            seed: args.seed,
            ..SamplingParams::greedy()
        },
        _ => SamplingParams::greedy(),
    };
    let spec = if args.no_draft {
        Speculation::Off
    } else {
        Speculation::Auto
    };
    let mut s = rt
        .chat()
        .sampling(sampling)
        .max_new_tokens(args.max_new_tokens)
        .speculation(spec);
    if let Some(sys) = &args.system {
        s = s.system(sys.clone());
    }
    s
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut builder = Runtime::builder()
        .target(&args.model)
        .weights(args.weights)
        .device(args.device.parse()?);
    if !args.no_draft {
        builder = builder.draft(&args.draft);
    }
    let rt = builder.build().await?;
    let mut chat = session(&rt, &args);
    eprintln!(
        "falconer chat ({} backend, format {:?}); /reset clears history, /quit leaves",
        rt.info().backend,
        rt.chat_format()
    );

    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("User: ");
        let Some(line) = lines.next() else { break };
        let line = line?;
        match line.trim() {
            "" => continue,
            "/quit" => break,
            "/reset" => {
                chat = session(&rt, &args);
                continue;
            }
            _ => {}
        }
        print!("Falcon:");
        std::io::stdout().flush()?;
        let f = chat
            .reply(&line, |t| {
                print!("{t}");
                let _ = std::io::stdout().flush();
            })
            .await?;
        println!();
        let u = &f.usage;
        let acc = u
            .acceptance_rate()
            .map_or_else(|| "-".into(), |a| format!("{:.0}%", a * 100.0));
        eprintln!(
            "[{} tokens, {:.1} tokens/s, acceptance {acc}, {:.2} tokens/target pass, {}]",
            u.generated_tokens,
            u.tokens_per_second(),
            u.tokens_per_pass(),
            f.reason.as_str()
        );
    }
    Ok(())
}
