"""How long an engine takes to start, in a fresh process as a worker starts it: the imports, the
weights, the tokenizer, the KV cache. Against the baseline in the same run: the same start with
the tokenizer loaded by ``AutoTokenizer.from_pretrained`` (the engine's loader before
2026-11-29), whose AutoConfig lookup imports the model's config module and, with transformers 5,
torch.distributed.tensor and sympy.

    python benchmarks/start_bench.py [--model smollm2-135m] [--rounds 5]

Each round starts one process of each kind, in alternating order; medians count. Timed inside
the process, from its first line to the Engine being built (the interpreter's own start is not
counted). Writes benchmarks/results/start_<cpu>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

CHILD = """
import time
t0 = time.perf_counter()
import sys
if sys.argv[1] == "autotokenizer":  # the baseline: the loader as it was
    import transformers
    import lmdisagg.engine.loader as loader
    loader._hf_tokenizer = lambda path: transformers.AutoTokenizer.from_pretrained(str(path))
from lmdisagg.engine import Engine, EngineConfig
Engine(EngineConfig(model=sys.argv[2]))
took = time.perf_counter() - t0
heavy = [m for m in ("transformers.models.llama.configuration_llama", "torch.distributed.tensor", "sympy")
         if m in sys.modules]
print(repr((took, heavy)))
"""


def start(kind: str, model: str) -> tuple[float, list[str]]:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, model], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{kind}: {out.stderr[-2000:]}")
    return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own child's repr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    kinds = ("engine", "autotokenizer")
    secs: dict[str, list[float]] = {k: [] for k in kinds}
    loaded: dict[str, list[str]] = {}
    start(kinds[0], args.model)  # warm the page cache (weights, modules) for both
    for r in range(args.rounds):
        for k in (kinds if r % 2 == 0 else kinds[::-1]):
            s, heavy = start(k, args.model)
            secs[k].append(s)
            loaded[k] = heavy
            print(f"round {r + 1}: {k:14s} {s:6.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in secs.items()}
    out = {"benchmark": "engine start", "hardware": describe("cpu"), "model": args.model,
           "timed": "in a fresh process, from its first line to Engine(EngineConfig(model)) returning; medians",
           "results": [{"start": k, "seconds": round(med[k], 3), "runs": [round(x, 3) for x in secs[k]],
                        "heavy_modules_loaded": loaded[k]} for k in kinds],
           "ratio": round(med["autotokenizer"] / med["engine"], 3)}
    RESULTS.mkdir(exist_ok=True)
    tag = cpu_model().split("(")[0].strip().lower().replace(" ", "-")
    path = RESULTS / f"start_{tag}-{os.cpu_count()}core.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"engine {med['engine']:.2f} s, with AutoTokenizer {med['autotokenizer']:.2f} s: "
          f"{out['ratio']:.2f}x faster; wrote {path}")


if __name__ == "__main__":
    main()
