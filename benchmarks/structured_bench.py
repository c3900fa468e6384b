"""Structured outputs' cost: the time of B requests constrained by a JSON schema against the same
B requests unconstrained, generating the same number of tokens each, same engine, same process.

    python benchmarks/structured_bench.py                    # CPU: SmolLM2-135M, fp32
    python benchmarks/structured_bench.py --device cuda      # a random-weight SmolLM2-shaped model
                                                             # with a byte-level tokenizer, bf16

Each round: B chat requests (temperature 1, seeds 0..B-1) with the schema below and max_tokens N
run to completion; request i stops after n_i tokens (EOS once its JSON is complete, or N). Then
the same B requests without the schema, with ``ignore_eos`` and max_tokens n_i: the same tokens
per request, the same batches, only the grammar differs. ``ratio``: unconstrained time over
constrained time (1.0: free), each the best of --rounds alternated rounds (every round is in
the JSON; the token counts are the same in every round: fixed seeds).
The masks are made on the CPU inside the engine step (one xgrammar matcher per request, one
bitmask for the batch, one copy to the device, one masking kernel), so the figure is what that
costs against a step. Writes ``structured_<hardware>.json`` under --out. Needs no Ray.
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

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
    "friends": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "city", "friends"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON with a name, an age, a city and friends."}]


def run(engine: Engine, prompt: list[int], params: list[SamplingParams], device: str) -> tuple[float, list[int]]:
    rids = [f"sb-{time.monotonic_ns()}-{i}" for i in range(len(params))]
    counts = dict.fromkeys(rids, 0)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for rid, p in zip(rids, params):
        engine.add_request(rid, prompt, p)
    while engine.has_unfinished():
        for out in engine.step():
            counts[out.request_id] += len(out.new_token_ids)
    return time.perf_counter() - t0, [counts[r] for r in rids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if args.device == "cuda":
        import tempfile

        from lmdisagg.models.registry import DUMMY_SHAPES
        from tests.engine.random_llama import write_random_llama
        model = write_random_llama(Path(tempfile.mkdtemp()) / "m", DUMMY_SHAPES["smollm2-135m-dummy"], byte_level=True)
        engine = Engine(model=str(model), device="cuda", dtype="bfloat16", kv_cache_bytes=4 << 30, max_num_seqs=64)
        model_name = "random-weight SmolLM2-135M shape, byte-level tokenizer, bf16"
    else:
        engine = Engine(model="smollm2-135m", max_num_seqs=64)
        model_name = "SmolLM2-135M-Instruct, fp32"
    prompt = engine.encode_chat(ASK) if engine.tokenizer.hf.chat_template else engine.encode(ASK[0]["content"])
    desc, tag = hardware(args.device)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        rounds = []
        for r in range(args.rounds + 1):  # the first round warms up (compiles the schema, graphs)
            con = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i, structured=("json", SCHEMA))
                   for i in range(b)]
            t_con, n = run(engine, prompt, con, args.device)
            free = [SamplingParams(max_tokens=k, temperature=1.0, seed=i, ignore_eos=True) for i, k in enumerate(n)]
            t_free, n2 = run(engine, prompt, free, args.device)
            assert n2 == n, (n, n2)
            if r:
                rounds.append({"constrained_s": round(t_con, 4), "unconstrained_s": round(t_free, 4), "tokens": sum(n)})
        con_s = min(x["constrained_s"] for x in rounds)  # each side's best round (noise only slows one)
        free_s = min(x["unconstrained_s"] for x in rounds)
        row = {"batch": b, "tokens": rounds[0]["tokens"], "constrained_s": con_s, "unconstrained_s": free_s,
               "ratio": round(free_s / con_s, 3),
               "mask_ms_per_token": round(1e3 * (con_s - free_s) / rounds[0]["tokens"], 3), "rounds": rounds}
        rows.append(row)
        print(f"B={b:3d}: {row['tokens']} tokens, constrained {row['constrained_s']:.3f}s, unconstrained "
              f"{row['unconstrained_s']:.3f}s, ratio {row['ratio']}, {row['mask_ms_per_token']} ms/token", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"structured_{tag}.json"
    path.write_text(json.dumps({"benchmark": "structured_bench", "hardware": desc, "machine": describe(args.device),
                                "model": model_name, "schema": SCHEMA, "max_tokens": args.max_tokens,
                                "results": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
