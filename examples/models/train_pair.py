#!/usr/bin/env python3
"""Train the small Falcon pair shipped in examples/models (a target and its draft).

Both are `FalconForCausalLM` checkpoints in the HF layout that falconer loads:

* falcon-mini        target, Falcon-40B/180B layout (new decoder, grouped-query attention
                     6 query / 2 kv heads, separate ln_attn/ln_mlp), 10 layers, hidden 384.
* falcon-mini-draft  draft, Falcon-7B layout (multi-query, one shared layer norm, parallel
                     attention/MLP), 4 layers, hidden 192.

They share a 4096-token byte-level BPE tokenizer (`<|endoftext|>` = id 0 = bos = eos), rotary
positions (theta 10000), no biases and tied embeddings. The corpus is the Python source of the
host's own standard library and site-packages, so no download is needed. The draft is trained
after the target, on the same data, optionally distilled from the trained target's logits.

    python3 examples/models/train_pair.py --out examples/models      # full run, ~6 min
    python3 examples/models/train_pair.py --smoke --out /tmp/pair    # ~20 s check of every path

Writes falcon-mini/ and falcon-mini-draft/ (config.json, model.safetensors in bf16,
generation_config.json, tokenizer.json, tokenizer_config.json), TRAINING.json with the measured
numbers and README.md under --out. Needs torch, transformers (5.x) and tokenizers.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from array import array
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import tokenizers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import FalconConfig, FalconForCausalLM  # noqa: E402

EOT = "<|endoftext|>"
VOCAB = 4096
SEQ = 512
MAX_FILE_BYTES = 200_000
SKIP_DIRS = {"__pycache__", "test", "tests", "testing", "idle_test", "site-packages", "dist-packages"}
SIZE_LIMIT = 40_000_000  # both model dirs together, bytes
ARCH = {
    "target": dict(hidden_size=384, num_attention_heads=6, num_kv_heads=2, num_hidden_layers=10,
                   ffn_hidden_size=1536, new_decoder_architecture=True, parallel_attn=True),
    "draft": dict(hidden_size=192, num_attention_heads=3, num_kv_heads=1, num_hidden_layers=4,
                  ffn_hidden_size=768, new_decoder_architecture=False, multi_query=True,
                  parallel_attn=True),
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def key_hash(key):
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- corpus
def list_sources():
    """Every .py file under stdlib/purelib/platlib as {realpath: 'root-label/relative/path'}."""
    paths = sysconfig.get_paths()
    found = {}
    for label in ("stdlib", "purelib", "platlib"):
        root = paths.get(label)
        if not root or not os.path.isdir(root):
            continue
        root = os.path.realpath(root)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for name in sorted(filenames):
                if not name.endswith(".py") or name.startswith("test_"):
                    continue
                real = os.path.realpath(os.path.join(dirpath, name))
                if real not in found:
                    found[real] = label + "/" + os.path.relpath(os.path.join(dirpath, name), root)
    return found


def gather_corpus(cap_bytes, val_min_bytes):
    """Reads files in hash order (so a cap samples all packages) until cap_bytes, dedupes by
    content, then splits: the first 1% of files in hash order (at least val_min_bytes) are the
    held-out set. Both splits come back sorted by path: [(key, text)]."""
    found = list_sources()
    chosen, seen, total = [], set(), 0
    for real, key in sorted(found.items(), key=lambda kv: key_hash(kv[1])):
        if total >= cap_bytes:
            break
        try:
            size = os.path.getsize(real)
            if size == 0 or size > MAX_FILE_BYTES:
                continue
            with open(real, "rb") as fh:
                raw = fh.read()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha1(raw).digest()
        if not text.strip() or EOT in text or digest in seen:
            continue
        seen.add(digest)
        chosen.append((key, text))
        total += len(raw)
    n_val = max(1, round(len(chosen) * 0.01))
    while n_val < len(chosen) - 1 and sum(len(t.encode()) for _, t in chosen[:n_val]) < val_min_bytes:
        n_val += 1
    val, train = sorted(chosen[:n_val]), sorted(chosen[n_val:])
    log(f"corpus: {len(found)} .py files found, {len(chosen)} used ({total / 1e6:.1f} MB), "
        f"{len(train)} train / {len(val)} held-out files")
    return train, val


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(train, sample_bytes):
    total = sum(len(t) for _, t in train)
    stride = max(1, total // sample_bytes)
    sample = [t for _, t in train[::stride]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t0 = time.time()
    tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
    assert tok.token_to_id(EOT) == 0, "<|endoftext|> must be id 0"
    assert tok.get_vocab_size() <= VOCAB
    for text in sample[:20]:  # byte-level BPE must round-trip exactly
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    log(f"tokenizer: vocab {tok.get_vocab_size()} from {sum(len(t) for t in sample) / 1e6:.1f} MB "
        f"of text in {time.time() - t0:.1f}s")
    return tok


def encode(tok, texts, chunk=2048):
    """One int16 stream: EOT file EOT file EOT ... (ids < 4096 fit in int16)."""
    ids = array("h", [0])
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    for i in range(0, len(texts), chunk):
        for enc in encode_batch(texts[i:i + chunk], add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(0)
    return torch.frombuffer(ids, dtype=torch.int16).clone()


# ----------------------------------------------------------------------------- models
def build(kind, seed):
    cfg = FalconConfig(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, max_position_embeddings=2048,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, alibi=False,
                       bias=False, tie_word_embeddings=True, hidden_dropout=0.0, attention_dropout=0.0,
                       attn_implementation="sdpa", **ARCH[kind])
    torch.manual_seed(seed)
    model = FalconForCausalLM(cfg)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight, "embeddings not tied"
    return model


def n_params(model):
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once


def to_bf16(model):
    """Parameters to bf16; buffers (the rotary inv_freq) stay fp32, as from_pretrained has them."""
    for p in model.parameters():
        p.grad = None
        p.data = p.data.to(torch.bfloat16)
    return model.eval()


def autocast(dev):
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


def train(model, name, tokens, dev, args, budget_s, max_steps, peak_lr, teacher=None):
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak_lr, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda")
    gen = torch.Generator(device=dev)
    gen.manual_seed(args.seed + (1 if teacher is None else 2))
    offsets = torch.arange(SEQ + 1, device=dev)
    high = tokens.numel() - SEQ - 1
    assert high > 0, "training stream shorter than one window"
    warmup = 5 if args.smoke else 200
    log_every = 5 if args.smoke else 50
    step, t0 = 0, time.time()
    t_log, step_log = t0, 0
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget_s or step >= max_steps:
            break
        # linear warmup by steps, cosine decay to 10% by wall-clock fraction of the budget
        frac = min(1.0, elapsed / budget_s)
        lr = peak_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1.0 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, high, (args.batch,), device=dev, generator=gen)
        window = tokens[starts[:, None] + offsets].long()
        x, y = window[:, :-1], window[:, 1:].reshape(-1)
        with autocast(dev):
            logits = model(input_ids=x, use_cache=False).logits
        logits = logits.float().reshape(-1, VOCAB)
        ce = F.cross_entropy(logits, y)
        loss = ce
        if teacher is not None:  # 50/50 CE and KL(target || draft) at temperature 1
            with torch.no_grad(), autocast(dev):
                t_logits = teacher(input_ids=x, use_cache=False).logits
            t_logp = F.log_softmax(t_logits.float().reshape(-1, VOCAB), dim=-1)
            kl = F.kl_div(F.log_softmax(logits, dim=-1), t_logp, reduction="batchmean", log_target=True)
            loss = 0.5 * ce + 0.5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % log_every == 0:
            ce_val = ce.item()  # synchronises, so the rate below is real
            now = time.time()
            rate = (step - step_log) * args.batch * SEQ / max(now - t_log, 1e-9)
            extra = f" total {loss.item():.3f}" if teacher is not None else ""
            log(f"{name} step {step:5d}  ce {ce_val:.3f}{extra}  lr {lr:.2e}  {rate / 1e3:.0f}k tok/s  "
                f"{now - t0:.0f}/{budget_s:.0f}s")
            t_log, step_log = now, step
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    final = ce.item() if step else float("nan")
    log(f"{name}: {step} steps in {seconds:.1f}s, last ce {final:.3f}")
    del opt
    return {"steps": step, "seconds": round(seconds, 1), "tokens_seen": step * args.batch * SEQ,
            "peak_lr": peak_lr, "distilled": teacher is not None, "last_train_ce": round(final, 4)}


# ----------------------------------------------------------------------------- evaluation
def spaced(n_items, high):
    """n_items evenly spaced start offsets in [0, high]."""
    return [round(i * high / max(1, n_items - 1)) for i in range(n_items)]


@torch.no_grad()
def heldout_loss(model, val, dev, n_windows, bs=25):
    starts = spaced(n_windows, val.numel() - SEQ - 1)
    total, count = 0.0, 0
    for i in range(0, len(starts), bs):
        w = torch.stack([val[s:s + SEQ + 1] for s in starts[i:i + bs]]).long().to(dev)
        with autocast(dev):
            logits = model(input_ids=w[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.float().reshape(-1, VOCAB), w[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += w[:, 1:].numel()
    return total / count


@torch.no_grad()
def acceptance(target, draft, val, dev, n_prompts, prompt_len=64, gen_len=64):
    """Greedy-continue held-out prompts with the target, then teacher-force both models on
    prompt+continuation and compare argmaxes at the continuation positions."""
    starts = spaced(n_prompts, val.numel() - prompt_len)
    seq = torch.stack([val[s:s + prompt_len] for s in starts]).long().to(dev)
    for _ in range(gen_len):
        with autocast(dev):
            nxt = target(input_ids=seq, use_cache=False).logits[:, -1].float().argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    inp, cont = seq[:, :-1], seq[:, prompt_len:]
    with autocast(dev):
        d_pred = draft(input_ids=inp, use_cache=False).logits[:, prompt_len - 1:].float().argmax(-1)
        t_pred = target(input_ids=inp, use_cache=False).logits[:, prompt_len - 1:].float().argmax(-1)
    match = d_pred == cont
    result = {"rate": match.float().mean().item(), "prompts": n_prompts, "prompt_len": prompt_len,
              "gen_len": gen_len, "target_self_consistency": (t_pred == cont).float().mean().item()}
    for k in (4, 8):  # expected tokens per target forward with a fixed draft length k
        emitted = rounds = 0
        for row in match.tolist():
            pos = 0
            while pos < len(row):
                n = 0
                while n < k and pos + n < len(row) and row[pos + n]:
                    n += 1
                pos, emitted, rounds = pos + n + 1, emitted + n + 1, rounds + 1
        result[f"tokens_per_target_forward_k{k}"] = round(emitted / rounds, 3)
    return result


# ----------------------------------------------------------------------------- saving
def save(model, tok, path, check_ids, dev):
    model.to("cpu")
    model.generation_config.bos_token_id = 0
    model.generation_config.eos_token_id = 0
    model.save_pretrained(str(path))
    assert (path / "model.safetensors").is_file(), f"{path}: no model.safetensors written"
    tok.save(str(path / "tokenizer.json"), pretty=False)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": EOT, "eos_token": EOT, "model_max_length": 2048}, indent=2) + "\n")
    gen_path = path / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen.update(bos_token_id=0, eos_token_id=0)
    gen_path.write_text(json.dumps(gen, indent=2) + "\n")
    # round trip: the saved directory must reproduce the in-memory model
    model.to(dev)
    reloaded = FalconForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(dev).eval()
    with torch.no_grad(), autocast(dev):
        a = model(input_ids=check_ids, use_cache=False).logits.float()
        b = reloaded(input_ids=check_ids, use_cache=False).logits.float()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    log(f"saved {path}: reload argmax agreement {agree:.4f}, max |dlogit| {(a - b).abs().max().item():.4f}")
    return round(agree, 4)


def dir_bytes(path):
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def write_readme(out, report):
    t, d, acc, c = report["target"], report["draft"], report["acceptance"], report["corpus"]
    smoke = ("\n> **Smoke run** (`--smoke`): these models are barely trained; rerun without "
             "`--smoke` for the real pair.\n" if report["args"]["smoke"] else "")
    rows = [
        ("Layout", "Falcon-40B/180B: new decoder, GQA 6 q / 2 kv heads, ln_attn + ln_mlp",
         "Falcon-7B: multi-query (1 kv head), parallel attn/MLP, one layer norm"),
        ("Layers / hidden / heads / kv heads / FFN",
         *(" / ".join(str(ARCH[k][f]) for f in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                 "num_kv_heads", "ffn_hidden_size")) for k in ("target", "draft"))),
        ("Parameters", f"{t['params']:,}", f"{d['params']:,}"),
        ("Size on disk (dir)", f"{t['dir_bytes'] / 1e6:.1f} MB", f"{d['dir_bytes'] / 1e6:.1f} MB"),
        ("Training steps / seconds", f"{t['steps']} / {t['seconds']}", f"{d['steps']} / {d['seconds']}"),
        ("Tokens seen", f"{t['tokens_seen'] / 1e6:.1f} M", f"{d['tokens_seen'] / 1e6:.1f} M"),
        ("Held-out loss (nats/token)", f"{t['heldout_loss']:.3f}", f"{d['heldout_loss']:.3f}"),
        ("Held-out perplexity", f"{t['heldout_ppl']:.2f}", f"{d['heldout_ppl']:.2f}"),
    ]
    table = "\n".join(f"| {a} | {b} | {c_} |" for a, b, c_ in rows)
    text = f"""# falcon-mini and falcon-mini-draft

A small real target/draft pair for falconer's speculative decoding, trained from scratch by
`train_pair.py` in this folder. Both are HF `FalconForCausalLM` checkpoints (`config.json`,
bf16 `model.safetensors`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`)
and share one 4096-token byte-level BPE tokenizer (`<|endoftext|>` = id 0 = bos = eos), rotary
positions (theta 10000), no biases and tied embeddings. They write Python-looking code and
nothing else.
{smoke}
| | `falcon-mini` (target) | `falcon-mini-draft` (draft) |
|---|---|---|
{table}

Greedy acceptance of the draft against the target: **{acc['rate']:.1%}** ({acc['prompts']} held-out
prompts of {acc['prompt_len']} tokens, {acc['gen_len']} greedy target tokens each, teacher-forced);
that is about {acc['tokens_per_target_forward_k4']} tokens per target forward with 4 drafted tokens.
The draft was {'distilled from the target (50% CE, 50% KL)' if d['distilled'] else 'trained on plain next-token loss'}.

## Corpus

The Python sources of the training host's standard library and site-packages (test directories,
files over 200 KB, non-UTF-8 files and duplicates skipped): {c['train_files']:,} training files
({c['train_bytes'] / 1e6:.1f} MB, {c['train_tokens'] / 1e6:.1f} M tokens) and {c['val_files']} held-out
files ({c['val_bytes'] / 1e6:.2f} MB, {c['val_tokens'] / 1e3:.0f} k tokens), chosen by a hash of the path.
Trained with torch {report['versions']['torch']}, transformers {report['versions']['transformers']},
tokenizers {report['versions']['tokenizers']} on {report['versions']['device']}; all numbers are in
`TRAINING.json`.

## Use

```
cargo run --release --example generate -- --draft examples/models/falcon-mini-draft --prompt "def fibonacci(n):"
```

## Retrain

```
python3 examples/models/train_pair.py --out examples/models            # --minutes 6 by default
python3 examples/models/train_pair.py --smoke --out /tmp/pair          # 20-second check
```

The corpus depends on the host's installed packages, so a retrain gives a similar, not an
identical, pair.
"""
    (out / "README.md").write_text(text)


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget, both models")
    ap.add_argument("--smoke", action="store_true", help="tiny end-to-end run (~20 s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64, help="sequences of 512 tokens per step")
    ap.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                    help="distill the draft from the trained target (--no-distill: plain CE)")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda":
        log("WARNING: no CUDA device, training on CPU")
    t_start = time.time()

    cap, sample, val_min = (4e6, 2e6, 100e3) if args.smoke else (150e6, 20e6, 500e3)
    train_files, val_files = gather_corpus(int(cap), int(val_min))
    tok = train_tokenizer(train_files, int(sample))
    t0 = time.time()
    train_ids = encode(tok, [t for _, t in train_files])
    val_ids = encode(tok, [t for _, t in val_files])
    log(f"encoded: {train_ids.numel() / 1e6:.2f} M train tokens, {val_ids.numel() / 1e3:.0f} k held-out "
        f"tokens in {time.time() - t0:.1f}s")
    assert val_ids.numel() > SEQ + 2, "held-out stream shorter than one window"
    train_dev = train_ids.to(dev)

    budget = 10.0 if args.smoke else args.minutes * 60.0
    target_steps, draft_steps = (20, 15) if args.smoke else (10**9, 10**9)
    n_windows, n_prompts = (8, 4) if args.smoke else (200, 50)

    target = build("target", args.seed).to(dev)
    draft = build("draft", args.seed + 1).to(dev)
    log(f"target params {n_params(target):,}  draft params {n_params(draft):,}")

    t_stats = train(target, "target", train_dev, dev, args, 0.7 * budget, target_steps, 1e-3)
    to_bf16(target)
    d_budget = max(budget - t_stats["seconds"], 0.3 * budget if args.smoke else 1.0)
    d_stats = train(draft, "draft", train_dev, dev, args, d_budget, draft_steps, 2e-3,
                    teacher=target if args.distill else None)
    to_bf16(draft)
    del train_dev

    for stats, model in ((t_stats, target), (d_stats, draft)):
        stats["heldout_loss"] = round(heldout_loss(model, val_ids, dev, n_windows), 4)
        stats["heldout_ppl"] = round(math.exp(stats["heldout_loss"]), 3)
        stats["params"] = n_params(model)
    acc = acceptance(target, draft, val_ids, dev, n_prompts)
    log(f"held-out loss: target {t_stats['heldout_loss']:.3f} (ppl {t_stats['heldout_ppl']:.2f}), "
        f"draft {d_stats['heldout_loss']:.3f} (ppl {d_stats['heldout_ppl']:.2f})")
    log(f"greedy acceptance {acc['rate']:.3f} (target self-consistency "
        f"{acc['target_self_consistency']:.3f}), tokens/target forward k=4: "
        f"{acc['tokens_per_target_forward_k4']}")

    check_ids = train_ids[: 2 * SEQ].long().reshape(2, SEQ).to(dev)
    dirs = {"target": out / "falcon-mini", "draft": out / "falcon-mini-draft"}
    for (kind, model), stats in zip((("target", target), ("draft", draft)), (t_stats, d_stats)):
        stats["reload_agreement"] = save(model, tok, dirs[kind], check_ids, dev)
        stats["dir_bytes"] = dir_bytes(dirs[kind])
        stats["config"] = {k: getattr(model.config, k) for k in
                           ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_kv_heads",
                            "ffn_hidden_size", "new_decoder_architecture", "multi_query", "parallel_attn")}
    total = t_stats["dir_bytes"] + d_stats["dir_bytes"]
    log(f"model dirs: {total / 1e6:.2f} MB in all (limit {SIZE_LIMIT / 1e6:.0f} MB)")

    report = {
        "corpus": {"train_files": len(train_files), "val_files": len(val_files),
                   "train_bytes": sum(len(t.encode()) for _, t in train_files),
                   "val_bytes": sum(len(t.encode()) for _, t in val_files),
                   "train_tokens": train_ids.numel(), "val_tokens": val_ids.numel(),
                   "tokenizer_vocab": tok.get_vocab_size(), "seq_len": SEQ},
        "target": t_stats, "draft": d_stats, "acceptance": acc,
        "heldout_windows": n_windows, "model_dirs_bytes": total,
        "args": {"minutes": args.minutes, "smoke": args.smoke, "seed": args.seed,
                 "batch": args.batch, "distill": args.distill},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"},
        "wall_seconds": round(time.time() - t_start, 1),
    }
    (out / "TRAINING.json").write_text(json.dumps(report, indent=2) + "\n")
    write_readme(out, report)
    log(f"wrote {out / 'TRAINING.json'} and {out / 'README.md'} ({report['wall_seconds']}s in all)")
    assert total <= SIZE_LIMIT, f"model dirs take {total} bytes, over the {SIZE_LIMIT} limit"
    for stats in (t_stats, d_stats):
        assert stats["reload_agreement"] >= 0.99, "a saved model does not reproduce the trained one"


if __name__ == "__main__":
    sys.exit(main())
