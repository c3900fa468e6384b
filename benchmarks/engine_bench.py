"""Engine speed: prefill and decode tokens/s of lmdisagg's engine vs HF transformers, same process.

    python benchmarks/engine_bench.py                                  # CPU: SmolLM2-135M bf16
    python benchmarks/engine_bench.py --device cuda --model llama-3-8b-dummy --out DIR
    python benchmarks/engine_bench.py --prefill "" --decode-prompt 512 --batches 1,16,32 --suffix=-ctx512

Prefill: one request of L random tokens, prompt -> first token (ours: one step with max_tokens=1;
HF: generate(max_new_tokens=1), its prefill step with logits of the last token only).
Decode: B requests of P random tokens; tokens/s of the N steps after the first token (ours: the
timed steps; HF: generate(N+1) minus generate(1) on the same prompts, default DynamicCache).
Each figure is the best of rounds that alternate ours and HF, after a warm-up of each shape (the
best, not the median: on a shared machine other processes only ever slow a round down; every
round's number is in the JSON).
On CUDA the run also measures the bf16 matmul peak (8192^3) and the model FLOPs utilisation of
the longest prefill: (2 * matmul params * tokens + 2 * L * Hq * D * S^2 causal attention) / time.

Writes ``engine_<hardware>.json`` under --out (default benchmarks/results) and prints one table.
Imports neither Ray nor pydantic (the GPU host has neither).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py, also when run through runpy
from machine import cpu_model, memory_gib  # noqa: E402

from lmdisagg.engine import Engine, SamplingParams  # noqa: E402
from lmdisagg.models import resolve_model  # noqa: E402


def hardware(device: str) -> tuple[str, str]:
    """(description, file tag) of the machine the numbers come from."""
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        desc = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
        name = p.name
    else:
        name = cpu_model()
        desc = f"{name} {os.cpu_count()}-core VM, {memory_gib():.0f} GiB, no GPU"
        name = f"{name} {os.cpu_count()}core"
    return desc, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_hf(model: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    src = resolve_model(model)
    if src.path is not None:
        return AutoModelForCausalLM.from_pretrained(str(src.path), dtype=dtype, attn_implementation="sdpa").to(device).eval()
    cfg = LlamaConfig(**src.dummy.to_hf())
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # built in place: an 8B model is too big to build on the host
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)


class Runs:
    def __init__(self, engine: Engine, hf, device: str, vocab: int, seed: int):
        self.engine, self.hf, self.device, self.vocab = engine, hf, device, vocab
        self.rng = random.Random(seed)
        self.n = 0

    def prompt(self, n: int) -> list[int]:  # fresh random tokens: never a prefix-cache hit
        return [self.rng.randrange(10, self.vocab) for _ in range(n)]

    def ours_prefill(self, length: int) -> float:
        e = self.engine
        e.add_request(f"p{self.n}", self.prompt(length), SamplingParams(max_tokens=1, ignore_eos=True))
        self.n += 1
        t = time.perf_counter()
        while e.has_unfinished():
            e.step()
        return time.perf_counter() - t

    def hf_generate(self, ids: torch.Tensor, new: int) -> float:
        sync(self.device)
        t = time.perf_counter()
        with torch.inference_mode():
            self.hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync(self.device)
        return time.perf_counter() - t

    def hf_prefill(self, length: int) -> float:
        return self.hf_generate(torch.tensor([self.prompt(length)], device=self.device), 1)

    def ours_decode(self, batch: int, prompt: int, new: int) -> float:
        e = self.engine
        for _ in range(batch):
            e.add_request(f"d{self.n}", self.prompt(prompt), SamplingParams(max_tokens=new + 1, ignore_eos=True))
            self.n += 1
        steps = e.stats.steps
        while e.stats.steps == steps or len(e.scheduler.waiting):  # prefill: every request has its first token
            e.step()
        t = time.perf_counter()
        while e.has_unfinished():
            e.step()
        return batch * new / (time.perf_counter() - t)

    def hf_decode(self, batch: int, prompt: int, new: int) -> float:
        ids = torch.tensor([self.prompt(prompt) for _ in range(batch)], device=self.device)
        first = self.hf_generate(ids, 1)
        return batch * new / (self.hf_generate(ids, new + 1) - first)


def kv_bytes(model: str, dtype: torch.dtype, batches: list[int], tokens: int) -> int:
    """A cache that holds the largest decode batch whole (256-token blocks, 2 spare per sequence)."""
    from lmdisagg.models import resolve_model
    cfg = json.loads((resolve_model(model, fetch=False).path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * dtype.itemsize
    return max(batches) * (-(-tokens // 256) + 2) * 256 * per_token


def decode_attention(engine) -> str:
    """Which decode attention the engine ran."""
    att = engine.runner.model.attention
    if engine.runner.triton:
        return "triton"
    return "cpu C++ paged (lmdisagg.kernels.cpu_attention)" if att.paged_decode else "torch (gather + matmul/SDPA)"


def matmul_peak(device: str) -> float:
    """TFLOP/s of an 8192^3 bf16 matmul: mean of 10 after 3 warm-ups."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * 8192**3 * 10 / (time.perf_counter() - t) / 1e12


def prefill_flops(cfg, tokens: int) -> float:
    hq, hkv, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * cfg.intermediate_size
    return 2 * per_layer * cfg.num_layers * tokens + 2 * cfg.num_layers * hq * d * tokens**2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, help="default: smollm2-135m (cpu), llama-3-8b-dummy (cuda)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-graphs", action="store_true", help="ours without CUDA graphs")
    ap.add_argument("--decode-prompt", type=int, default=None, help="prompt tokens of the decode runs "
                    "(default: 512 on cuda, 128 on cpu)")
    ap.add_argument("--decode-new", type=int, default=None, help="timed decode steps (default: 64 cuda, 32 cpu)")
    ap.add_argument("--batches", default="1,16", help="decode batch sizes, comma-separated")
    ap.add_argument("--prefill", default=None, help="prefill lengths, comma-separated ('' for none)")
    ap.add_argument("--suffix", default="", help="appended to the result file's name")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    model = args.model or ("llama-3-8b-dummy" if cuda else "smollm2-135m")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    prefill_lens = [512, 2048, 8192] if cuda else [512, 2048]
    if args.prefill is not None:
        prefill_lens = [int(x) for x in args.prefill.split(",") if x]
    prompt, new = (512, 64) if cuda else (128, 32)
    prompt, new = args.decode_prompt or prompt, args.decode_new or new
    batches = [int(x) for x in args.batches.split(",")]

    peak = matmul_peak("cuda") if cuda else None
    engine = Engine(model=model, device=args.device, dtype=args.dtype,
                    kv_cache_bytes=(4 << 30) if cuda else max(256 << 20, kv_bytes(model, dtype, batches, prompt + new)),
                    max_num_seqs=max(16, *batches), max_model_len=max(prefill_lens + [prompt + new]) + 128,
                    cuda_graphs=not args.no_graphs)
    # steady state: a serving engine has long since touched every page of its (lazily zeroed, on
    # CPU) cache; first-touch page faults would otherwise be charged to the timed prefills
    engine.kv_buffer.zero_()
    hf = load_hf(model, args.device, dtype)
    runs = Runs(engine, hf, args.device, engine.model_config.vocab_size, seed=0)
    load0 = os.getloadavg()[0]

    rows = []  # (name, ours, hf, unit)
    for length in prefill_lens:
        runs.ours_prefill(length), runs.hf_prefill(length)  # warm-up
        ours, base = [], []
        for _ in range(args.rounds):
            ours.append(length / runs.ours_prefill(length))
            base.append(length / runs.hf_prefill(length))
        rows.append((f"prefill {length} tok", ours, base, "tok/s"))
    for b in batches:
        runs.ours_decode(b, prompt, 4), runs.hf_decode(b, prompt, 4)  # warm-up (captures graphs)
        ours, base = [], []
        for _ in range(args.rounds):
            ours.append(runs.ours_decode(b, prompt, new))
            base.append(runs.hf_decode(b, prompt, new))
        rows.append((f"decode batch {b}", ours, base, "tok/s"))
    samples = {n: (o, h) for n, o, h, _ in rows}
    rows = [(n, max(o), max(h), u) for n, o, h, u in rows]

    mfu = None
    if cuda and prefill_lens:
        t = max(prefill_lens) / rows[len(prefill_lens) - 1][1]
        mfu = prefill_flops(engine.model_config, max(prefill_lens)) / t / 1e12 / peak
    desc, tag = hardware(args.device)
    print(f"\n{model} {args.dtype} on {desc} (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load avg {load0:.1f} -> {os.getloadavg()[0]:.1f})")
    print(f"{'metric':<20}{'ours':>12}{'HF':>12}{'ours/HF':>10}")
    for name, o, h, unit in rows:
        print(f"{name:<20}{o:>12.1f}{h:>12.1f}{o / h:>9.2f}x   {unit}")
    if cuda and prefill_lens:
        print(f"bf16 matmul peak {peak:.0f} TFLOP/s; prefill {max(prefill_lens)} MFU {100 * mfu:.1f}% of it; "
              f"decode batch 1 step {1000 / rows[len(prefill_lens)][1]:.2f} ms (ours) vs "
              f"{1000 / rows[len(prefill_lens)][2]:.2f} ms (HF)")
    import transformers
    result = {
        "hardware": desc, "device": args.device, "model": model, "dtype": args.dtype,
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "load_avg_start_end": [load0, os.getloadavg()[0]], "cuda_graphs": cuda and not args.no_graphs,
        "decode_prompt_tokens": prompt, "decode_new_tokens": new, "rounds": args.rounds,
        "decode_attention": decode_attention(engine),
        "results": [{"metric": n, "ours": o, "hf": h, "ratio": o / h, "unit": u,
                     "ours_rounds": samples[n][0], "hf_rounds": samples[n][1]} for n, o, h, u in rows],
        "bf16_matmul_peak_tflops": peak, "prefill_mfu": mfu,
        "mfu_flops": "2 * matmul params * tokens + 2 * layers * q_heads * head_dim * tokens^2" if cuda else None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine_{tag}{f'-{args.threads}thread' if args.threads else ''}{args.suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
