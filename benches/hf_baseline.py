#!/usr/bin/env python3
"""HF transformers side-by-side baseline for benches/gpu_decode/.

Runs transformers' FalconForCausalLM (eager, bf16, random weights from the config: no
download) in the same Falcon-7B shape as the Rust bench (hidden 4544, 32 layers, 71
heads sharing 1 kv head, vocab 65024), batch 1, on the GPU:

- greedy generation: 128-token prompt, 256 new tokens (min_new_tokens forces all 256),
  tokens/s = 256 / wall time of `generate` (its 128-token prefill included, as HF users
  see it; the prefill is about 1% of the call);
- one forward step over a 512-token cache for 1 and 5 new tokens (CUDA events, median),
  and their ratio (the verify-pass cost of speculative decoding).

Writes JSON to the path given as the first argument (default hf_baseline.json), which
the Rust bench prints beside its own figures when HF_BASELINE_JSON names it.
"""

import json
import statistics
import sys
import time

import torch
import transformers
from transformers import FalconConfig, FalconForCausalLM

PROMPT = 128
NEW_TOKENS = 256
GEN_RUNS = 2
CACHE = 512
STEP_REPS = 15


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else "hf_baseline.json"
    torch.manual_seed(0)
    cfg = FalconConfig(
        vocab_size=65024,
        hidden_size=4544,
        num_hidden_layers=32,
        num_attention_heads=71,
        multi_query=True,
        new_decoder_architecture=False,
        parallel_attn=True,
        bias=False,
        alibi=False,
        layer_norm_epsilon=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        bos_token_id=11,
        eos_token_id=11,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    dev = torch.device("cuda")
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = FalconForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model = model.to(dtype=torch.bfloat16).eval()
    torch.cuda.synchronize()
    load_s = time.time() - t0
    vocab = cfg.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=gen).to(dev)

    gen_kwargs = dict(do_sample=False, pad_token_id=0, use_cache=True)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=16, min_new_tokens=16, **gen_kwargs)
        torch.cuda.synchronize()
        runs = []
        for _ in range(GEN_RUNS):
            torch.cuda.synchronize()
            t = time.time()
            out = model.generate(
                prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **gen_kwargs
            )
            torch.cuda.synchronize()
            runs.append(time.time() - t)
            assert out.shape[1] == PROMPT + NEW_TOKENS, out.shape
        gen_s = statistics.median(runs)

        # One forward step over a 512-token cache.
        ctx = torch.randint(0, vocab, (1, CACHE), generator=gen).to(dev)
        res = model(ctx, use_cache=True)
        cache = res.past_key_values
        step_ms = {}
        for n in (1, 5):
            times = []
            for i in range(STEP_REPS + 2):
                toks = torch.randint(0, vocab, (1, n), generator=gen).to(dev)
                pos = torch.arange(CACHE, CACHE + n, device=dev)
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                model(toks, past_key_values=cache, use_cache=True, cache_position=pos)
                e.record()
                torch.cuda.synchronize()
                cache.crop(CACHE)
                if i >= 2:
                    times.append(s.elapsed_time(e))
            step_ms[n] = statistics.median(times)

    result = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
        "attn_implementation": "eager",
        "dtype": "bfloat16",
        "load_s": load_s,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "generate_runs_s": runs,
        "decode_tokens_per_s": NEW_TOKENS / gen_s,
        "decode_ms_per_token": gen_s * 1e3 / NEW_TOKENS,
        "cache_len": CACHE,
        "step_1_ms": step_ms[1],
        "verify_5_ms": step_ms[5],
        "verify_ratio": step_ms[5] / step_ms[1],
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
