//! specbench: plain against speculative decoding on a target/draft pair.
//!
//! ```text
//! cargo run --release --example specbench                     # the shipped pair, CPU
//! cargo run --release --features cuda --example specbench -- --device cuda
//! ```
//!
//! For k = 1..=8 (fixed draft length) and the adaptive policy it measures, greedy and
//! batch 1 over a set of prompts: the acceptance rate `a`, tokens per target pass `E`,
//! the cost ratio `c` (one draft decode step over one target decode step, both timed
//! through the same runtime), the measured speed-up over plain decoding and the bound
//! `E / (k c + 1)` of Leviathan et al. (2023) with the measured `E`. Every speculative
//! output is checked against the plain one token for token. Prints a table and writes
//! `specbench.csv` and `specbench.png` into `--out`.
//!
//! With `--temperature T` (> 0, and optionally `--top-k`, `--top-p`) every run samples
//! instead: speculative sampling keeps the target's distribution but not its sample
//! path, so outputs are not compared; acceptance, speed-up and bound are measured alike.

mod plot;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use clap::Parser;
use falconer::engine::sampling::SamplingParams;
use falconer::{GenerateRequest, Runtime, Speculation, Usage};

const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/models");

/// Starts of Python code: the shipped pair was trained on Python sources.
const PROMPTS: &[&str] = &[
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "    for i, line in enumerate(lines):\n        if not line.strip():\n",
    "def read_config(path):\n    with open(path) as f:\n",
    "    raise ValueError(\"invalid literal for int() with base %d: %r\" % (base, s))\n",
];

#[derive(Parser, Debug)]
#[command(about = "Plain vs speculative decoding: acceptance, cost ratio, speed-up and its bound")]
struct Args {
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/models/falcon-mini"))]
    model: PathBuf,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/models/falcon-mini-draft"))]
    draft: PathBuf,
    /// New tokens per prompt.
    #[arg(long, default_value_t = 96)]
    max_new_tokens: usize,
    /// Repetitions of each configuration; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Largest fixed draft length.
    #[arg(long, default_value_t = 8)]
    max_k: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// How the target's layer weights are held: checkpoint, int8, int4 or int4:g<group>.
    #[arg(long, default_value = "checkpoint")]
    weights: falconer::WeightFormat,
    /// Where specbench.csv and specbench.png go.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Sampling temperature; 0 (the default) decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k filter when sampling (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p (nucleus) mass when sampling (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
}

impl Args {
    /// The sampling parameters of every request (greedy unless `--temperature` > 0).
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: 1.0,
            seed: 1,
        }
    }
}

/// One configuration's totals over all prompts in one repetition.
#[derive(Default, Clone)]
struct Run {
    elapsed: Duration,
    usage: Usage,
}

impl Run {
    fn add(&mut self, u: &Usage) {
        self.elapsed += u.elapsed;
        let t = &mut self.usage;
        t.generated_tokens += u.generated_tokens;
        t.target_passes += u.target_passes;
        t.draft_tokens_proposed += u.draft_tokens_proposed;
        t.draft_tokens_accepted += u.draft_tokens_accepted;
    }
}

struct Row {
    name: String,
    k: Option<usize>,
    a: f64,
    e: f64,
    tokens_per_s: f64,
    speedup: f64,
    bound: f64,
    /// What a round cost besides the k draft steps, in target steps: the verify
    /// pass plus the runtime's overhead (the bound assumes 1).
    verify: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs every prompt once; returns the totals and the outputs.
async fn pass(
    rt: &Runtime,
    prompts: &[Vec<u32>],
    n: usize,
    spec: Speculation,
    k: Option<usize>,
    sampling: SamplingParams,
) -> Result<(Run, Vec<Vec<u32>>)> {
    let mut run = Run::default();
    let mut outs = Vec::new();
    for p in prompts {
        let mut req = GenerateRequest::ids(p.clone())
            .max_new_tokens(n)
            .eos(vec![])
            .speculation(spec)
            .sampling(sampling);
        if let Some(k) = k {
            req = req.draft_len(k);
        }
        let f = rt.generate(req).await?.collect().await?;
        run.add(&f.usage);
        outs.push(f.ids);
    }
    Ok((run, outs))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let device: falconer::Device = args.device.parse()?;
    let rt = Runtime::builder()
        .target(&args.model)
        .draft(&args.draft)
        .weights(args.weights)
        .device(device)
        .build()
        .await?;
    let draft_alone = Runtime::builder()
        .target(&args.draft)
        .device(device)
        .build()
        .await?;
    let tok = rt.tokenizer().clone();
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<_, _>>()?;
    let n = args.max_new_tokens;
    let sampling = args.sampling();
    sampling.validate()?;
    eprintln!(
        "models from {MODELS}; {} prompts x {n} new tokens, {} reps, {:?}, {}",
        prompts.len(),
        args.reps,
        device,
        if sampling.is_greedy() {
            "greedy".to_string()
        } else {
            format!("sampling {sampling:?}")
        }
    );

    // Warm up both runtimes. Then each repetition times plain decoding of the target
    // and of the draft and every speculative configuration back to back, so slow
    // drifts of the machine hit all of them alike; ratios are taken within a
    // repetition and their medians reported.
    let (_, plain_out) = pass(&rt, &prompts, n, Speculation::Off, None, sampling).await?;
    pass(
        &draft_alone,
        &prompts[..1],
        n,
        Speculation::Off,
        None,
        sampling,
    )
    .await?;
    let mut configs: Vec<Option<usize>> = (1..=args.max_k).map(Some).collect();
    configs.push(None);
    let per_token =
        |run: &Run| run.elapsed.as_secs_f64() / run.usage.generated_tokens.max(1) as f64;
    let (mut targets, mut drafts) = (Vec::new(), Vec::new());
    let mut spec: Vec<Vec<(f64, Run)>> = vec![Vec::new(); configs.len()];
    for _ in 0..args.reps {
        let t_target = per_token(
            &pass(&rt, &prompts, n, Speculation::Off, None, sampling)
                .await?
                .0,
        );
        targets.push(t_target);
        drafts.push(per_token(
            &pass(&draft_alone, &prompts, n, Speculation::Off, None, sampling)
                .await?
                .0,
        ));
        for (i, &k) in configs.iter().enumerate() {
            let (run, outs) = pass(&rt, &prompts, n, Speculation::DraftModel, k, sampling).await?;
            ensure!(
                !sampling.is_greedy() || outs == plain_out,
                "speculative output (k={k:?}) differs from plain greedy output"
            );
            spec[i].push((t_target / per_token(&run), run));
        }
    }
    drop(draft_alone);
    let t_target = median(targets.clone());
    let t_draft = median(drafts.clone());
    let c = median(drafts.iter().zip(&targets).map(|(d, t)| d / t).collect());

    let mut rows = Vec::new();
    for (k, runs) in configs.into_iter().zip(spec) {
        let speedup = median(runs.iter().map(|r| r.0).collect());
        let tokens_per_s = median(runs.iter().map(|r| 1.0 / per_token(&r.1)).collect());
        let mut total = Run::default();
        for (_, r) in &runs {
            total.add(&r.usage);
        }
        let u = &total.usage;
        let a = u.acceptance_rate().unwrap_or(0.0);
        let e = u.tokens_per_pass();
        // The adaptive policy's k varies: its bound uses the mean draft length.
        let k_eff = k.map_or_else(
            || u.draft_tokens_proposed as f64 / u.target_passes.max(1) as f64,
            |k| k as f64,
        );
        rows.push(Row {
            name: k.map_or_else(|| "adaptive".to_string(), |k| format!("k={k}")),
            k,
            a,
            e,
            tokens_per_s,
            speedup,
            bound: e / (k_eff * c + 1.0),
            verify: (e / speedup - k_eff * c).max(0.0),
        });
    }

    println!(
        "target {} ({} weights) / draft {} on {:?}",
        args.model.display(),
        args.weights,
        args.draft.display(),
        device
    );
    println!(
        "plain: {:.1} tokens/s (target step {:.3} ms); draft alone {:.3} ms/step; c = {c:.3}",
        1.0 / t_target,
        t_target * 1e3,
        t_draft * 1e3
    );
    println!("| config | a | E (tokens/pass) | c | tokens/s | speed-up | bound E/(kc+1) | speed-up / bound | verify+overhead (steps) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut csv = String::from("config,k,acceptance,tokens_per_pass,cost_ratio,tokens_per_s,speedup,bound,fraction_of_bound,verify_cost\n");
    for r in &rows {
        println!(
            "| {} | {:.3} | {:.2} | {c:.3} | {:.1} | {:.2}x | {:.2}x | {:.0}% | {:.2} |",
            r.name,
            r.a,
            r.e,
            r.tokens_per_s,
            r.speedup,
            r.bound,
            100.0 * r.speedup / r.bound,
            r.verify
        );
        csv += &format!(
            "{},{},{:.4},{:.4},{c:.4},{:.2},{:.4},{:.4},{:.4},{:.4}\n",
            r.name,
            r.k.map_or_else(String::new, |k| k.to_string()),
            r.a,
            r.e,
            r.tokens_per_s,
            r.speedup,
            r.bound,
            r.speedup / r.bound,
            r.verify
        );
    }
    if let Some(best) = rows
        .iter()
        .filter(|r| r.k.is_some())
        .max_by(|x, y| x.speedup.total_cmp(&y.speedup))
    {
        println!(
            "best fixed k: {} at {:.2}x ({:.0}% of its bound {:.2}x)",
            best.name,
            best.speedup,
            100.0 * best.speedup / best.bound,
            best.bound
        );
    }

    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("specbench.csv"), csv)?;
    let fixed = |f: fn(&Row) -> f64| {
        rows.iter()
            .filter_map(|r| r.k.map(|k| (k as f64, f(r))))
            .collect::<Vec<_>>()
    };
    let adaptive = rows.iter().find(|r| r.k.is_none()).map(|r| r.speedup);
    let mut hlines = vec![plot::HLine {
        label: "plain".into(),
        color: plot::GREY,
        y: 1.0,
    }];
    if let Some(y) = adaptive {
        hlines.push(plot::HLine {
            label: "adaptive".into(),
            color: plot::GREEN,
            y,
        });
    }
    plot::chart(
        &args.out.join("specbench.png"),
        "speculative speed-up",
        "draft length k",
        "speed-up",
        &[
            plot::Series {
                label: "measured".into(),
                color: plot::BLUE,
                points: fixed(|r| r.speedup),
                dots: true,
            },
            plot::Series {
                label: "bound".into(),
                color: plot::ORANGE,
                points: fixed(|r| r.bound),
                dots: false,
            },
        ],
        &hlines,
    )?;
    eprintln!(
        "wrote {} and specbench.png",
        args.out.join("specbench.csv").display()
    );
    Ok(())
}
