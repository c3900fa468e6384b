"""Serving benchmark: replay requests against the OpenAI router, disaggregated vs colocated, in
one run on the same machine.

    python benchmarks/serve_bench.py                                  # synthetic, CPU defaults
    python benchmarks/serve_bench.py --trace ../shared/data/traces/mooncake_synthetic_trace.jsonl \
        --num-requests 64 --length-scale 0.02 --time-scale 0.05
    python benchmarks/serve_bench.py --transport nccl --modes disaggregated,disaggregated+push

Modes: ``disaggregated`` (1 prefill + 1 decode worker, the decode worker pulls the KV),
``disaggregated+push`` (the same with ``transport.push``: nccl only), ``colocated`` (2 workers).

Each request is streamed over HTTP (SSE, as the openai client reads it; ignore_eos, token-id
prompts); TTFT / ITL / end-to-end latency are taken per request at the client. Trace requests get token ids
synthesized per 512-token hash id (equal ids → equal tokens, so shared prefixes stay shared).
Prints one table; writes benchmarks/results/serve_<host>.json and .png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py, also when run through runpy
from machine import describe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def synth_tokens(hash_id: int, n: int, vocab: int) -> list[int]:
    rng = random.Random(hash_id * 7919 + 17)
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def workload(args, vocab: int) -> list[dict]:
    rng = random.Random(args.seed)
    reqs = []
    if args.trace:
        for i, line in enumerate(open(args.trace)):
            if i >= args.num_requests:
                break
            r = json.loads(line)
            n_in = max(8, int(r["input_length"] * args.length_scale))
            block = max(1, int(512 * args.length_scale))
            ids = []
            for h in r["hash_ids"]:
                ids += synth_tokens(h, block, vocab)
            reqs.append({"t": r["timestamp"] / 1000.0 * args.time_scale, "prompt": ids[:n_in],
                         "max_tokens": max(1, min(args.max_output, r["output_length"]))})
        t0 = reqs[0]["t"] if reqs else 0
        for r in reqs:
            r["t"] -= t0
    else:
        shared = synth_tokens(10**6, args.shared_prefix, vocab)
        t = 0.0
        for i in range(args.num_requests):
            t += rng.expovariate(args.rate) if args.rate > 0 else 0.0
            n = rng.randint(args.input_len // 2, args.input_len)
            reqs.append({"t": t, "prompt": shared + synth_tokens(i, n, vocab), "max_tokens": args.output_len})
    return reqs


async def replay(url: str, model: str, reqs: list[dict]) -> list[dict]:
    """Send every request at its arrival time (streaming SSE over aiohttp, the same wire format the
    openai client reads); stamp each token as it arrives."""
    import aiohttp
    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=3600)

    async def one(session, r):
        await asyncio.sleep(max(0.0, r["t"] - (time.perf_counter() - start)))
        sent = time.perf_counter()
        stamps = []
        body = {"model": model, "prompt": r["prompt"], "max_tokens": r["max_tokens"], "temperature": 0,
                "stream": True, "ignore_eos": True, "return_token_ids": True}
        async with session.post(url + "/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                ch = json.loads(line[6:])
                if "error" in ch:
                    raise RuntimeError(ch["error"])
                if ch["choices"] and ch["choices"][0].get("token_ids"):
                    stamps += [time.perf_counter()] * len(ch["choices"][0]["token_ids"])
        itl = [b - a for a, b in zip(stamps, stamps[1:])]
        return {"ttft": stamps[0] - sent, "e2e": stamps[-1] - sent, "itl": itl, "out": len(stamps),
                "in": len(r["prompt"])}

    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        out = await asyncio.gather(*(one(session, r) for r in reqs))
    wall = time.perf_counter() - start
    for o in out:
        o["wall"] = wall
    return out


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def summarize(name: str, res: list[dict]) -> dict:
    ttft = [r["ttft"] for r in res]
    e2e = [r["e2e"] for r in res]
    itl = [x for r in res for x in r["itl"]]
    wall = res[0]["wall"]
    return {"mode": name, "requests": len(res), "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99), "e2e_p50_s": pct(e2e, 50),
            "e2e_p99_s": pct(e2e, 99), "output_tok_per_s": sum(r["out"] for r in res) / wall,
            "requests_per_s": len(res) / wall, "mean_ttft_s": statistics.mean(ttft),
            "_ttft": ttft, "_itl": itl}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--transport", default="shm")
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--rate", type=float, default=2.0, help="synthetic arrivals per second (0 = all at once)")
    ap.add_argument("--input-len", type=int, default=384)
    ap.add_argument("--shared-prefix", type=int, default=0)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--trace", default=None, help="Mooncake-format trace (jsonl)")
    ap.add_argument("--length-scale", type=float, default=0.02, help="scale trace token lengths")
    ap.add_argument("--time-scale", type=float, default=1.0, help="scale trace arrival times")
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--gpus", type=int, default=0, help="GPUs per actor (GPU runs: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="disaggregated,colocated")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--suffix", default="", help="appended to the result's file name, e.g. --suffix=-nccl-push")
    args = ap.parse_args()

    import ray
    from lmdisagg import Pipeline, Role
    from lmdisagg.config import TransportSettings
    import os
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=8, log_to_driver=False)
    cpus = 1.0
    summaries, raw = [], {}
    for mode in args.modes.split(","):
        role = Role(replicas=1, num_cpus=cpus, num_gpus=args.gpus)
        kw = ({"prefill": role, "decode": role} if mode.startswith("disaggregated")
              else {"colocated": Role(replicas=2, num_cpus=cpus, num_gpus=args.gpus)})
        transport = TransportSettings(name=args.transport, push=mode == "disaggregated+push")
        pipe = Pipeline(model=args.model, transport=transport, device=args.device, dtype=args.dtype,
                        policy="least_loaded", **kw).start()
        try:
            vocab = pipe.router.tokenizer.vocab_size if pipe.router.tokenizer else 32000
            reqs = workload(args, vocab)
            asyncio.run(replay(pipe.url, pipe.router.model_name, reqs[:2]))  # warm-up
            res = asyncio.run(replay(pipe.url, pipe.router.model_name, reqs))
            s = summarize(mode, res)
            stats = pipe.worker_stats()
            s["kv_pulled_bytes"] = sum(w.stats.get("pulled_bytes", 0) for w in stats.values())
            s["kv_pull_seconds"] = sum(w.stats.get("pull_seconds", 0.0) for w in stats.values())
            s["kv_transfer_seconds"] = sum(w.stats.get("transfer_seconds", 0.0) for w in stats.values())
            d = [w.stats for w in stats.values() if w.worker_id.startswith("decode")]
            # the decode worker's wait for each prompt's KV: a pull (from its request to the bytes
            # landed), or a push (from decode() asking to the bytes landed; they move meanwhile)
            s["kv_pushed_chunks"] = sum(x.get("pushed_chunks", 0) for x in d)
            s["kv_push_wait_seconds"] = sum(x.get("push_seconds", 0.0) for x in d)
            s["kv_recomputed_prompts"] = sum(x.get("recomputed_prompts", 0) for x in d)
            summaries.append(s)
        finally:
            pipe.shutdown()
    ray.shutdown()

    base = next((s for s in summaries if s["mode"] == "colocated"), summaries[0])
    print(f"\n{'mode':18s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'ITL p50':>8s} {'ITL p99':>8s} {'E2E p99':>8s} "
          f"{'tok/s':>7s} {'vs coloc':>8s} {'KV wait ms/req':>14s}")
    for s in summaries:
        print(f"{s['mode']:18s} {s['ttft_p50_s']:9.3f} {s['ttft_p99_s']:9.3f} {s['itl_p50_s']:8.4f} "
              f"{s['itl_p99_s']:8.4f} {s['e2e_p99_s']:8.3f} {s['output_tok_per_s']:7.1f} "
              f"{s['output_tok_per_s'] / base['output_tok_per_s']:8.2f} "
              f"{(s['kv_pull_seconds'] + s['kv_push_wait_seconds']) / s['requests'] * 1e3:14.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{'cpu' if args.device == 'cpu' else 'cuda'}"
    doc = {"hardware": describe(args.device), "model": args.model, "device": args.device, "transport": args.transport,
           "workload": {k: v for k, v in vars(args).items() if k not in ("out",)},
           "results": [{k: v for k, v in s.items() if not k.startswith("_")} for s in summaries]}
    (out / f"serve_{tag}{args.suffix}.json").write_text(json.dumps(doc, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for s in summaries:
            for ax, key, label in ((axes[0], "_ttft", "TTFT (s)"), (axes[1], "_itl", "ITL (s)")):
                xs = sorted(s[key])
                ax.plot(xs, [i / max(1, len(xs) - 1) for i in range(len(xs))], label=s["mode"])
                ax.set_xlabel(label)
                ax.set_ylabel("CDF")
                ax.legend()
        fig.suptitle(f"{args.model} on {doc['hardware']}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"serve_{tag}{args.suffix}.png", dpi=110)
    except ImportError:
        pass
    print(f"wrote {out / f'serve_{tag}{args.suffix}.json'}")


if __name__ == "__main__":
    main()
