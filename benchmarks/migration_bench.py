"""What a worker dying mid-request costs the client: the stall in its token stream.

    python benchmarks/migration_bench.py                         # CPU, the embedded model, shm
    python benchmarks/migration_bench.py --device cuda --transport nccl      # 2 GPUs (dummy weights)

One prefill and two decode actors (lmdisagg.Pipeline, the same router as the HTTP API). Each
round streams one greedy request and SIGKILLs the decode worker serving it after
``--kill-after`` tokens; the router resumes it on the other decode worker (the prefill worker
computes prompt + the streamed tokens, the KV moves over the transport, decoding goes on) and
Ray restarts the killed one, which the next round waits for.

    stall       from the kill to the resumed stream's first token (tokens the killed worker had
                sent before it died may arrive after the kill: they come first)
    gap         the wait between the two tokens the client sees around the migration
    detect      from the kill to the router knowing (Ray reports the actor dead): part of the stall
    baseline    in the same process and round, sent first: time to first token of a fresh request
                of prompt + --kill-after tokens, computed from nothing (the resumed prefill reuses
                the prompt's cached chunks, so it costs less)
    ratio       stall / baseline

Every resumed stream is checked against one engine's tokens. Writes
benchmarks/results/migration_<cpu | h100x2 ...>_<transport>_wait<ms>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py, also when run through runpy
from machine import describe  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def host_tag(device: str) -> str:
    """"cpu", or the GPUs as "h100x2" (the JSON names the hardware in full)."""
    if device != "cuda":
        return "cpu"
    import torch
    name = torch.cuda.get_device_name(0).split()
    model = next((w for w in name if any(c.isdigit() for c in w)), name[-1]).lower()
    return f"{model}x{torch.cuda.device_count()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--transport", default="shm")
    ap.add_argument("--model", default=None, help="default: smollm2-135m on CPU, its dummy shape on CUDA")
    ap.add_argument("--dtype", default="float32", help="float32 (the default: resumed streams must match one "
                    "engine's tokens) or bfloat16 (they may not: checked and reported)")
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--kill-after", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lost-worker-wait-ms", type=int, default=None,
                    help="ray.lost_worker_wait_ms (default: the config's); 1000 is Ray's own default")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/migration_<host>.json)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from lmdisagg import Pipeline, Role
    from lmdisagg.engine import Engine, SamplingParams

    cuda = args.device == "cuda"
    model = args.model or ("smollm2-135m-dummy" if cuda else "smollm2-135m")
    engine_kw = {"device": args.device, "dtype": args.dtype, "kv_cache_bytes": 1 << 30, "max_model_len": 4096}
    ref_engine = Engine(model=model, **engine_kw)
    pipe = Pipeline(model=model, prefill=Role(num_gpus=1 if cuda else 0),
                    decode=Role(replicas=2, num_gpus=0.5 if cuda else 0), transport=args.transport,
                    **engine_kw)
    if args.lost_worker_wait_ms is not None:
        ray_cfg = pipe.config.ray.model_copy(update={"lost_worker_wait_ms": args.lost_worker_wait_ms})
        pipe.config = pipe.config.model_copy(update={"ray": ray_cfg})
    wait_ms = pipe.config.ray.lost_worker_wait_ms
    pipe.start()
    import ray
    rows = []
    try:
        pids = dict(ray.get([a.__ray_call__.remote(lambda w: (w.worker_id, os.getpid())) for a in pipe.actors]))
        for rnd in range(args.rounds):
            rng = random.Random(rnd)
            prompt = [rng.randrange(1000, 40000) for _ in range(args.prompt_tokens)]  # both vocabularies: 49,152
            params = dict(max_tokens=args.max_tokens, ignore_eos=True)
            expected = ref_engine.generate(prompt, SamplingParams(**params))[0].token_ids
            # baseline: a fresh request as long as the context the resumed one recomputes
            context = prompt + expected[:args.kill_after]
            t0 = time.perf_counter()
            for _ in pipe.stream(context, max_tokens=1, ignore_eos=True):
                ttft = time.perf_counter() - t0
                break
            got, stamps, killed_at, victim = [], [], None, None
            seen = threading.Event()
            migrated = pipe.router.metrics.registry.get_sample_value
            before = migrated("lmdisagg_request_migrations_total", {"role": "decode"}) or 0.0

            def watch():  # when the router learns of the death (its migration counter moves)
                while not seen.wait(0.0005):
                    if (migrated("lmdisagg_request_migrations_total", {"role": "decode"}) or 0.0) > before:
                        detected.append(time.perf_counter())
                        return
            detected: list[float] = []
            watcher = threading.Thread(target=watch, daemon=True)
            for d in pipe.stream(prompt, **params):
                got += d.token_ids
                stamps.append(time.perf_counter())
                if victim is None and len(got) >= args.kill_after:
                    busy = [w for w, s in pipe.worker_stats().items() if w.startswith("decode") and s.running]
                    victim = busy[0]
                    watcher.start()
                    killed_at = time.perf_counter()
                    os.kill(pids[victim], signal.SIGKILL)
                    k = len(stamps)
            seen.set()
            watcher.join()
            if not detected:
                raise SystemExit(f"round {rnd}: the router never counted a migration")
            detect = detected[0] - killed_at
            # tokens the killed worker had sent before it died may still arrive after the kill: the
            # resumed stream's first token is the first to arrive after the router knew
            j = next(i for i, t in enumerate(stamps) if t > detected[0])
            stall = stamps[j] - killed_at
            gap = stamps[j] - stamps[j - 1]
            itls = [b - a for a, b in zip(stamps, stamps[1:])]
            del itls[j - 1]  # the gap across the migration
            rows.append({"round": rnd, "prompt_tokens": args.prompt_tokens, "killed_after_tokens": k,
                         "resumed_tokens": j, "stall_ms": round(stall * 1e3, 2), "gap_ms": round(gap * 1e3, 2),
                         "detect_ms": round(detect * 1e3, 2),
                         "baseline_ttft_ms": round(ttft * 1e3, 2),
                         "ratio": round(stall / ttft, 3), "itl_ms_median": round(statistics.median(itls) * 1e3, 2),
                         "same_tokens": got == expected, "killed": victim})
            print(f"round {rnd}: killed {victim} after {k} tokens, resumed after {j}; stall {stall * 1e3:8.1f} ms "
                  f"(the router knew after {detect * 1e3:.1f} ms), a fresh "
                  f"{len(context)}-token request's TTFT {ttft * 1e3:8.1f} ms (x{stall / ttft:.2f}); ITL "
                  f"{rows[-1]['itl_ms_median']} ms; tokens {'==' if got == expected else '!='} one engine's",
                  flush=True)
            # Ray restarts the killed worker: wait for its new process before the next round
            deadline = time.monotonic() + 300
            while True:
                try:
                    new = dict(ray.get([a.__ray_call__.remote(lambda w: (w.worker_id, os.getpid()))
                                        for a in pipe.actors], timeout=30))
                    if new[victim] != pids[victim]:
                        pids = new
                        break
                except Exception:  # noqa: BLE001 - still restarting
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"{victim} did not come back within 300 s")
                time.sleep(0.5)
            ref = pipe.router.by_id[victim]
            while not (ref.alive and ref.info.pid == pids[victim]):  # the router has seen the new process
                if time.monotonic() > deadline:
                    raise SystemExit(f"the router did not take {victim} back within 300 s")
                time.sleep(0.1)
    finally:
        pipe.shutdown()
    name = f"migration_{host_tag(args.device)}_{args.transport}_wait{wait_ms}.json"
    out = Path(args.out) if args.out else RESULTS / name
    summary = {k: statistics.median(r[k] for r in rows)
               for k in ("stall_ms", "gap_ms", "detect_ms", "baseline_ttft_ms", "ratio")}
    data = {"benchmark": "migration_bench", "hardware": describe(args.device), "model": model,
            "transport": args.transport, "device": args.device, "dtype": args.dtype, "lost_worker_wait_ms": wait_ms,
            "timed": "stall: SIGKILL of the decoding worker -> the resumed stream's first token at the client "
                     "(in-process Pipeline stream); gap: the wait between the two tokens around the migration; "
                     "detect: SIGKILL -> the router counts the migration (it knows the actor died); baseline: "
                     "TTFT of a fresh request as long as prompt + --kill-after tokens, cold, same round; "
                     "ratio = stall / baseline",
            "summary_median": summary, "all_same_tokens": all(r["same_tokens"] for r in rows), "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"median stall {summary['stall_ms']:.1f} ms vs TTFT {summary['baseline_ttft_ms']:.1f} ms "
          f"(x{summary['ratio']:.2f}); wrote {out}")
    if not data["all_same_tokens"]:
        if args.dtype == "float32":
            raise SystemExit("a resumed stream differed from one engine's tokens")
        print(f"(in {args.dtype} a resumed stream may leave one engine's greedy path: its streamed tokens' KV is "
              f"recomputed by a prefill, whose rounding differs from the decode steps')")


if __name__ == "__main__":
    main()
