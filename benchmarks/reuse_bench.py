"""TTFT with KV reuse from each tier vs recomputing the prompt, engine level (no HTTP, no Ray).

For each context length: recompute (no cache) is the baseline; then the same prompt is served
from L1 (the engine's own prefix cache: GPU memory on CUDA), L2 (host memory), L3 (local disk, both
page-cached and cold via posix_fadvise DONTNEED), L4 (Redis). Before each store-tier run the
engine's pool is flooded with other chunks, so the prompt must come from that tier. Every cached
run must return the recomputed run's first token. TTFT is measured from add_request (including
the store lookup and load) to the first token.

    python benchmarks/reuse_bench.py                                  # SmolLM2, CPU, 2K and 8K
    python benchmarks/reuse_bench.py --device cuda --model llama-3-8b-dummy --contexts 2048 8192

Imports only torch, numpy, xxhash and lmdisagg.engine / lmdisagg.kv.store (no pydantic, no Ray);
Redis (redis-py + a redis-server binary or --redis-url) and matplotlib are used when present.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py, also when run through runpy
from machine import describe  # noqa: E402

from lmdisagg.engine import Engine, SamplingParams  # noqa: E402
from lmdisagg.kv.store import StoreBridge, TieredStore, store_namespace  # noqa: E402
from lmdisagg.kv.store.disk import DiskTier  # noqa: E402
from lmdisagg.kv.store.host import HostTier  # noqa: E402

PARAMS = SamplingParams(max_tokens=1, ignore_eos=True)


def start_redis() -> tuple[str, subprocess.Popen] | None:
    """A throwaway redis-server on 127.0.0.1 on a free port -> (url, process); None (and says so)
    without redis-py or the redis-server binary."""
    try:
        import redis  # noqa: F401  (the L4 tier needs redis-py)
        exe = shutil.which("redis-server")
    except ImportError:
        exe = None
    if exe is None:
        print("no redis-py or redis-server here: skipping the L4 row")
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return f"redis://127.0.0.1:{port}/0", p
        except OSError:
            time.sleep(0.05)
    p.kill()
    print("redis-server did not start: skipping the L4 row")
    return None


def flood_l1(engine: Engine) -> None:
    """Fill every block of the engine's pool with other chunks so nothing of the prompt is left."""
    junk = torch.zeros(engine.layout.chunk_shape, dtype=engine.dtype, device=engine.device)
    n = engine.blocks.num_blocks
    engine.import_chunks([os.urandom(16) for _ in range(n)], [junk] * n)
    engine.drain_kv_events()  # not the store's business


def drop_page_cache(disk: DiskTier, keys) -> None:
    for k in keys:
        try:
            fd = os.open(disk.path(k), os.O_RDONLY)
        except FileNotFoundError:
            continue
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def timed(bridge: StoreBridge, prompt: list[int]):
    (res, load), = bridge.generate([prompt], PARAMS)
    return res, load


def bench_context(args, ctx: int, redis_url: str | None) -> dict:
    rng = random.Random(args.seed + ctx)
    engine = Engine(model=args.model, device=args.device, chunk_tokens=args.chunk_tokens,
                    num_blocks=-(-ctx // args.chunk_tokens) + 2, max_model_len=ctx, seed=args.seed)
    vocab = engine.model_config.vocab_size
    prompt_of = lambda: [rng.randrange(100, vocab - 100) for _ in range(ctx - 1)]  # noqa: E731
    ns = store_namespace(engine)
    nbytes = engine.layout.chunk_nbytes * (-(-ctx // args.chunk_tokens))
    disk_dir = Path(args.disk_path or tempfile.mkdtemp(prefix="lmdisagg-reuse-"))
    sync = (lambda: torch.cuda.synchronize()) if engine.device.type == "cuda" else (lambda: None)

    # baseline: recompute, same engine, same measuring path (a bridge over an empty store)
    plain = TieredStore([])
    bridge = StoreBridge(engine, plain)
    timed(bridge, prompt_of())  # warm-up
    recompute = []
    for _ in range(args.repeats):
        flood_l1(engine)
        sync()
        recompute.append(timed(bridge, prompt_of())[0].ttft_s)
    bridge.close()
    plain.close()

    prompt = prompt_of()
    keys = engine.chunk_keys(prompt)[:(len(prompt) - 1) // args.chunk_tokens]
    rows: dict[str, dict] = {}

    def measure(name: str, bridge: StoreBridge, expect: str | None, before=None):
        ttft, load_s, served, cached = [], [], None, 0
        for _ in range(args.repeats):
            if expect is not None:
                flood_l1(engine)
            if before:
                before()
            sync()
            res, load = timed(bridge, prompt)
            assert res.token_ids == ref.token_ids, f"{name}: output differs from recompute"
            want = {expect: len(keys)} if expect else {}
            assert load.served == want and load.cached_chunks == len(keys), (name, load)
            ttft.append(res.ttft_s)
            load_s.append(load.seconds)
            served, cached = load.served, res.cached_tokens
            bridge.flush(120)
        rows[name] = {"ttft_s": ttft, "load_s": load_s, "served_chunks": served, "cached_tokens": cached}

    tiers = [HostTier(2 * nbytes), DiskTier(disk_dir, ns, 2 * nbytes)]
    if redis_url:
        from lmdisagg.kv.store.redis_tier import RedisTier
        tiers.append(RedisTier(redis_url, ns, op_timeout_s=30))
    full = TieredStore(tiers, io_threads=args.io_threads)
    bridge = StoreBridge(engine, full, load_timeout_s=120, skip_slow_tiers=False)  # measure every tier
    flood_l1(engine)
    ref, _ = timed(bridge, prompt)  # computes it and writes it through to every tier
    assert bridge.flush(300)
    measure("L1 engine", bridge, None)
    measure("L2 cpu", bridge, "cpu")
    bridge.close()
    full.close()

    stores = [("L3 disk (page cache)", [DiskTier(disk_dir, ns, 2 * nbytes)], "disk", None)]
    stores.append(("L3 disk (cold)", [DiskTier(disk_dir, ns, 2 * nbytes)], "disk", "drop"))
    if redis_url:
        from lmdisagg.kv.store.redis_tier import RedisTier
        stores.append(("L4 redis", [RedisTier(redis_url, ns, op_timeout_s=30)], "redis", None))
    for name, tiers, expect, extra in stores:
        store = TieredStore(tiers, io_threads=args.io_threads)
        bridge = StoreBridge(engine, store, load_timeout_s=120, skip_slow_tiers=False)
        before = (lambda t=tiers[0]: drop_page_cache(t, keys)) if extra == "drop" else None
        measure(name, bridge, expect, before)
        bridge.close()
        store.close()
    if not args.disk_path:
        shutil.rmtree(disk_dir, ignore_errors=True)

    base = statistics.median(recompute)
    for r in rows.values():
        r["ttft_median_s"] = statistics.median(r["ttft_s"])
        r["speedup"] = base / r["ttft_median_s"]
    return {"prompt_tokens": len(prompt), "chunks": len(keys), "recompute_s": recompute,
            "recompute_median_s": base, "tiers": rows}


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    ctxs = list(result["contexts"])
    names = list(result["contexts"][ctxs[0]]["tiers"])
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(ctxs)
    for i, c in enumerate(ctxs):
        vals = [result["contexts"][c]["tiers"][n]["speedup"] for n in names]
        ax.bar([x + i * w for x in range(len(names))], vals, w, label=f"{c} tokens")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xticks([x + w * (len(ctxs) - 1) / 2 for x in range(len(names))], names, fontsize=8)
    ax.set_ylabel("TTFT speedup vs recompute (x)")
    ax.set_title(f"KV reuse per tier: {result['model']} on {result['device']}\n{result['hardware']}", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--io-threads", type=int, default=4, help="store I/O threads (reads run in parallel)")
    ap.add_argument("--redis-url", default=None, help="default: start redis-server on 127.0.0.1 if installed")
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument("--disk-path", default=None, help="L3 directory (default: a temp dir, removed after)")
    ap.add_argument("--hardware", default=None, help="describe the machine (default: detected)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/reuse_<model>_<device>.json)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    redis_url, proc = args.redis_url, None
    if redis_url is None and not args.no_redis:
        redis_url, proc = start_redis() or (None, None)
    try:
        result = {"model": args.model, "device": args.device, "hardware": args.hardware or describe(args.device),
                  "chunk_tokens": args.chunk_tokens, "repeats": args.repeats, "io_threads": args.io_threads, "torch": torch.__version__,
                  "contexts": {}}
        for ctx in args.contexts:
            result["contexts"][str(ctx)] = bench_context(args, ctx, redis_url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)

    print(f"\n{args.model} on {args.device}: {result['hardware']}")
    print(f"{'context':>8} {'tier':<22} {'TTFT ms':>9} {'load ms':>8} {'speedup':>8} {'cached':>7}")
    for ctx, c in result["contexts"].items():
        print(f"{ctx:>8} {'recompute':<22} {c['recompute_median_s'] * 1e3:9.1f} {'':>8} {1.0:7.1f}x {0:7d}")
        for name, r in c["tiers"].items():
            print(f"{ctx:>8} {name:<22} {r['ttft_median_s'] * 1e3:9.1f} "
                  f"{statistics.median(r['load_s']) * 1e3:8.1f} {r['speedup']:7.1f}x {r['cached_tokens']:7d}")
    tag = f"{args.model}_{args.device.split(':')[0]}"
    out = Path(args.out or Path(__file__).parent / "results" / f"reuse_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
