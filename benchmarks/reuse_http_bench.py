"""TTFT through the HTTP API with KV reuse from each store tier vs recomputing the prompt.

A local CPU deployment as users run it: disaggregated, 1 prefill + 1 decode Ray actor, shm
transport, the real SmolLM2-135M, the prefill engine's pool made tiny (12 blocks: one ~1.9K-token
prompt fills 8, two more evict it). Every request goes through the official ``openai``
client, streamed; TTFT is taken at the client, from the call to the first chunk with text.

    recompute   distinct fresh prompts, cold (the baseline, same deployment)
    L1 engine   the same prompt again at once: still in the prefill engine's prefix cache
    L2 cpu      after other prompts evicted it from the engine: loaded from host memory
    L3 disk     a restarted deployment with L2 off over the same disk_path (page-cached files)
    L4 redis    a restarted deployment with only the Redis tier (a redis-server on 127.0.0.1)

Each cached request must return the recomputed text of the same prompt and report
``cached_tokens`` = full chunks x 256; ``/stats`` must show that the expected tier served it. The
JSON also keeps, per request, the prompt tokens the prefill engine still ran (``computed_tokens``:
the whole prompt cold, the partial last chunk on a hit): on the CPU that tail, attending over the
cached context, is most of a hit's TTFT (``--words 1900`` gives 8 full chunks and a shorter tail).
Prints one table; writes benchmarks/results/reuse_http_cpu.json.

    python benchmarks/reuse_http_bench.py
    python benchmarks/reuse_http_bench.py --repeats 5 --no-redis

The L4 row needs redis-py and a redis-server binary; it is skipped (with a message) without them.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray process on 127.0.0.1
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py, reuse_bench.py (imported in main)

MODEL = "smollm2-135m"
CHUNK = 256  # the engine's default chunk_tokens
TIERS = ("cpu", "disk", "redis")
WORDS = ("river", "stone", "cloud", "maple", "lantern", "harbor", "quiet", "ember", "orbit", "velvet", "meadow",
         "signal", "copper", "thistle", "glacier", "compass")  # tests/serving/test_kv_store_http.py's
TARGET, OTHERS = 1, (2, 3)  # prompt seeds: the reused prompt, and the ones that evict it from L1


def prompt(seed: int, words: int = 1700) -> str:
    """The test's prompts: 1700 words are ~1.9K tokens, 7 full 256-token chunks and a ~120-token tail."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Server:
    """One Pipeline deployment and a client on its HTTP API."""

    def __init__(self, store: dict, args):
        from openai import OpenAI

        from lmdisagg import Pipeline, Role
        t0 = time.perf_counter()
        self.pipe = Pipeline(model=MODEL, prefill=Role(), decode=Role(), transport="shm", max_model_len=2560,
                             num_blocks=12, store=store).start()
        self.client = OpenAI(base_url=self.pipe.url, api_key="unused", max_retries=0, timeout=600)
        self.args = args
        log(f"deployed {self.pipe.url} in {time.perf_counter() - t0:.0f} s, store {store}")

    def ask(self, text: str) -> dict:
        """One streamed completion: TTFT at the client, the text, usage."""
        t0 = time.perf_counter()
        stream = self.client.completions.create(
            model=MODEL, prompt=text, max_tokens=self.args.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        ttft, out, usage = None, "", None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                out += chunk.choices[0].text
            if chunk.usage is not None:
                usage = chunk.usage
        assert ttft is not None and usage is not None, "no text or no usage chunk in the stream"
        return {"ttft": ttft, "text": out, "cached": usage.prompt_tokens_details.cached_tokens,
                "prompt_tokens": usage.prompt_tokens}

    def stats(self) -> dict:
        import httpx
        return httpx.get(self.pipe.url[: -len("/v1")] + "/stats", timeout=30).json()["workers"]["prefill-0"]

    def counters(self) -> dict[str, int]:
        """Chunks served per store tier and prompt tokens run through the prefill engine, so far."""
        st = self.stats()
        return {**{t: st.get(f"store_{t}_chunks", 0) for t in TIERS}, "computed": st["computed_prompt_tokens"]}

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until write-through offloads stop, so they don't share the 2 cores with a timing."""
        last, deadline = None, time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.stats()
            now = (st.get("store_offloaded", 0), st.get("loading", 0), st.get("running", 0))
            if now == last and now[1] == 0 and now[2] == 0:
                return
            last = now
            time.sleep(0.3)

    def shutdown(self) -> None:
        self.pipe.shutdown()


def measure(srv: Server, name: str, ref: dict[int, str], chunks: int, expect: str | None, evict: bool,
            repeats: int) -> dict:
    """TTFT of the target prompt served again; ``expect`` is the store tier that must serve it
    (None: the engine itself, no tier)."""
    ttft, served, computed = [], {}, []
    for i in range(repeats):
        if evict:
            for s in OTHERS:  # two other prompts: nothing of the target is left in the 12 blocks
                r = srv.ask(prompt(s, srv.args.words))
                assert r["text"] == ref[s], f"{name}: evicting prompt {s} changed its text"
        srv.settle()
        before = srv.counters()
        r = srv.ask(prompt(TARGET, srv.args.words))
        after = srv.counters()
        delta = {t: after[t] - before[t] for t in TIERS if after[t] != before[t]}
        assert r["text"] == ref[TARGET], f"{name}: text differs from recompute: {r['text']!r} vs {ref[TARGET]!r}"
        assert r["cached"] == chunks * CHUNK, f"{name}: cached_tokens {r['cached']} != {chunks} x {CHUNK}"
        want = {expect: chunks} if expect else {}
        assert delta == want, f"{name}: served {delta}, expected {want}"
        ttft.append(r["ttft"])
        served = delta
        computed.append(after["computed"] - before["computed"])
        log(f"{name:<10} #{i + 1}: TTFT {r['ttft'] * 1e3:7.1f} ms, cached {r['cached']}, "
            f"computed {computed[-1]}, served {delta or 'engine (L1)'}")
    return {"ttft_s": ttft, "cached_tokens": chunks * CHUNK, "served": served or {"engine": chunks},
            "computed_tokens": computed}


def warm_up(srv: Server, seed: int) -> None:
    t0 = time.perf_counter()
    srv.ask(prompt(seed, srv.args.words))
    srv.settle()
    log(f"warm-up (a fresh prompt) {time.perf_counter() - t0:.1f} s")


def run(args, redis_url: str | None, disk: str) -> tuple[dict, int]:
    rows: dict[str, dict] = {}
    ref: dict[int, str] = {}
    full = {"cpu_bytes": 1 << 30, "disk_path": disk, "disk_bytes": 1 << 30}
    if redis_url:
        full["remote_url"] = redis_url

    srv = Server(full, args)
    try:
        warm_up(srv, 100)
        # recompute: the evicting prompts first, the target last (so it is in L1 right after)
        cold, computed = [], []
        for s in (*OTHERS, TARGET):
            srv.settle()
            before = srv.counters()["computed"]
            r = srv.ask(prompt(s, srv.args.words))
            computed.append(srv.counters()["computed"] - before)
            assert r["cached"] == 0, f"prompt {s} should be cold, got cached_tokens {r['cached']}"
            ref[s], n_prompt = r["text"], r["prompt_tokens"]
            cold.append(r["ttft"])
            log(f"{'recompute':<10} seed {s}: TTFT {r['ttft'] * 1e3:7.1f} ms, {r['prompt_tokens']} prompt tokens")
        chunks = (n_prompt - 1) // CHUNK  # the last token is always computed
        rows["recompute"] = {"ttft_s": cold, "cached_tokens": 0, "served": {}, "computed_tokens": computed}
        rows["L1 engine"] = measure(srv, "L1 engine", ref, chunks, None, False, args.repeats)
        rows["L2 cpu"] = measure(srv, "L2 cpu", ref, chunks, "cpu", True, args.repeats)
    finally:
        srv.shutdown()

    srv = Server({"cpu_bytes": 0, "disk_path": disk, "disk_bytes": 1 << 30}, args)  # restart, L2 off
    try:
        warm_up(srv, 101)
        rows["L3 disk"] = measure(srv, "L3 disk", ref, chunks, "disk", True, args.repeats)
    finally:
        srv.shutdown()

    if redis_url:
        srv = Server({"remote_url": redis_url}, args)  # restart, only Redis (another node's view)
        try:
            warm_up(srv, 102)
            rows["L4 redis"] = measure(srv, "L4 redis", ref, chunks, "redis", True, args.repeats)
        finally:
            srv.shutdown()
    return rows, n_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed requests per row (the median is reported)")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--words", type=int, default=1700,
                    help="prompt length in words (1700: ~1.9K tokens; a hit recomputes the partial last chunk)")
    ap.add_argument("--no-redis", action="store_true", help="skip the L4 row")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "reuse_http_cpu.json"))
    args = ap.parse_args()
    from machine import describe
    from reuse_bench import start_redis

    redis_url, proc = (None, None) if args.no_redis else (start_redis() or (None, None))

    import ray
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", namespace="lmdisagg",
             log_to_driver=False)
    disk = tempfile.mkdtemp(prefix="lmdisagg-reuse-http-")
    t0 = time.perf_counter()
    try:
        rows, n_prompt = run(args, redis_url, disk)
    finally:
        ray.shutdown()
        shutil.rmtree(disk, ignore_errors=True)
        if proc is not None:
            proc.terminate()
            proc.wait(10)

    base = statistics.median(rows["recompute"]["ttft_s"])
    for r in rows.values():
        r["ttft_median_s"] = statistics.median(r["ttft_s"])
        r["speedup"] = base / r["ttft_median_s"]
    result = {"benchmark": "reuse_http", "hardware": describe("cpu"), "model": MODEL, "prompt_tokens": n_prompt,
              "deployment": "disaggregated 1 prefill + 1 decode, transport shm, num_blocks 12, max_model_len 2560",
              "prompt_words": args.words, "repeats": args.repeats, "max_tokens": args.max_tokens, "rows": rows}

    print(f"\n{MODEL}, {n_prompt}-token prompt, TTFT through the HTTP API (openai client, streamed)")
    print(result["hardware"])
    print(f"{'row':<11} {'TTFT ms':>9} {'speedup':>8} {'cached':>7} {'computed':>9}  served by (chunks)")
    for name, r in rows.items():
        by = ", ".join(f"{t}: {n}" for t, n in r["served"].items()) or "-"
        print(f"{name:<11} {r['ttft_median_s'] * 1e3:9.1f} {r['speedup']:7.1f}x {r['cached_tokens']:7d} "
              f"{statistics.median(r['computed_tokens']):9.0f}  {by}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
