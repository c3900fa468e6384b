"""Sampling's cost in a decode step: B requests sampled (temperature, top_p, top_k, a seed each)
against the same B requests greedy, same engine, same process, the same number of tokens.

    python benchmarks/sampling_bench.py                  # CPU: SmolLM2-135M, fp32
    python benchmarks/sampling_bench.py --device cuda    # a random-weight SmolLM2-shaped model, bf16

Each round runs B requests (random 128-token prompts, ``ignore_eos``, N new tokens) three ways:
greedy; sampled; and sampled with the sampler's per-row values (temperatures, row indices) made
as they were before the change that added this script: copied from pageable host memory, each
copy a host wait for the step's forward, after which the sampling kernels were launched onto an
idle GPU (``pageable``, the same code path otherwise). ``ratio``: greedy time over sampled time
(1.0: sampling is free), ``ratio_pageable`` the same for the pageable variant; each time is the
best of --rounds alternated rounds (all are in the JSON). Writes ``sampling_<hardware>.json``
under --out. Needs no Ray.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py, engine_bench.py
from engine_bench import hardware  # noqa: E402
from machine import describe  # noqa: E402

from lmdisagg.engine import Engine, SamplingParams  # noqa: E402
from lmdisagg.engine import sampler  # noqa: E402


def pageable_on(dev, vals, dtype):
    return torch.tensor(vals, dtype=dtype, device=dev)  # the copy waits for the queued forward


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams], device: str) -> tuple[float, int]:
    rids = [f"sp-{time.monotonic_ns()}-{i}" for i in range(len(params))]
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for rid, ids, p in zip(rids, prompts, params):
        engine.add_request(rid, ids, p)
    tokens = 0
    while engine.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    cuda = args.device == "cuda"
    model = "smollm2-135m-dummy" if cuda else "smollm2-135m"
    engine = Engine(model=model, device=args.device, dtype="bfloat16" if cuda else "float32",
                    kv_cache_bytes=(2 << 30) if cuda else (1 << 30))
    vocab = engine.model_config.vocab_size
    rng = torch.Generator().manual_seed(0)
    results = []
    for b in (int(x) for x in args.batches.split(",")):
        prompts = [torch.randint(0, vocab, (128,), generator=rng).tolist() for _ in range(b)]
        greedy = [SamplingParams(max_tokens=args.new_tokens, ignore_eos=True) for _ in range(b)]
        sampled = [SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=0.8, top_p=0.9, top_k=50,
                                  seed=i) for i in range(b)]
        run(engine, prompts, greedy, args.device)  # warm-up (graphs, allocator)
        run(engine, prompts, sampled, args.device)
        times: dict[str, list[float]] = {"greedy": [], "sampled": [], "pageable": []}
        for _ in range(args.rounds):
            for kind in times:
                # fresh prompts each run would change the work; the same prompts hit the prefix
                # cache equally in every run (all but the first chunk-aligned part is recomputed)
                if kind == "pageable":
                    sampler._on, saved = pageable_on, sampler._on
                try:
                    secs, n = run(engine, prompts, greedy if kind == "greedy" else sampled, args.device)
                finally:
                    if kind == "pageable":
                        sampler._on = saved
                assert n == b * args.new_tokens
                times[kind].append(secs)
        best = {k: min(v) for k, v in times.items()}
        row = {"batch": b, "new_tokens": args.new_tokens,
               "ms_per_step": {k: round(v / args.new_tokens * 1e3, 3) for k, v in best.items()},
               "ratio": round(best["greedy"] / best["sampled"], 3),
               "ratio_pageable": round(best["greedy"] / best["pageable"], 3),
               "rounds_s": {k: [round(x, 4) for x in v] for k, v in times.items()}}
        results.append(row)
        print(f"B={b:3d}  ms/step greedy {row['ms_per_step']['greedy']:.3f}  sampled {row['ms_per_step']['sampled']:.3f}"
              f"  pageable {row['ms_per_step']['pageable']:.3f}  ratio {row['ratio']:.3f} (pageable "
              f"{row['ratio_pageable']:.3f})", flush=True)
    _, tag = hardware(args.device)
    out = Path(args.out) / f"sampling_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"hardware": describe(args.device), "device": args.device, "model": model,
                               "torch": torch.__version__, "sampled": "temperature 0.8, top_p 0.9, top_k 50, seed i",
                               "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
