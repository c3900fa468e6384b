"""``lmdisagg simulate``: replay a Mooncake-format trace through a real placement policy.

    lmdisagg simulate --trace FILE --workers N --policy NAME [--cache-chunks C] [--json]

The policy and the chunk index are the router's own code; workers, caches and time are simulated
(lmdisagg/sim/). Prints a markdown table, or with ``--json`` one JSON line (``hit_rate``,
``oracle_hit_rate``, ``ttft_p50_s``, ``ttft_p99_s``, ``slo_attainment``, ...). Exit code 2 with a
message naming the line numbers on a malformed trace.
"""
from __future__ import annotations

import argparse
import json
import sys

from lmdisagg.errors import InvalidRequestError



def register(sub) -> None:
    from lmdisagg.router.policies.cost import CostModel
    from lmdisagg.router.policy import POLICIES
    c = CostModel(chunk_tokens=512)
    p = sub.add_parser("simulate", help="replay a request trace through a placement policy",
                       description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trace", required=True, help="Mooncake-format JSONL trace")
    p.add_argument("--workers", type=int, default=16, help="prefill workers (colocated: all workers)")
    p.add_argument("--decode-workers", type=int, default=0, help="decode workers; 0 = colocated")
    p.add_argument("--policy", default="cache_aware", choices=sorted(POLICIES), help="placement policy")
    p.add_argument("--cache-chunks", type=int, default=1000,
                   help="GPU KV cache per worker in chunks (1000 x 64 MiB = 64 GB for 8B on H100)")
    p.add_argument("--cpu-cache-chunks", type=int, default=3000,
                   help="CPU KV tier per worker in chunks (0 = none)")
    p.add_argument("--workers-per-node", type=int, default=8, help="for transfer cost (NVLink vs RDMA)")
    p.add_argument("--block-tokens", type=int, default=c.chunk_tokens, help="tokens per trace hash id = chunk")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--speedup", type=float, default=1.0, help="divide arrival times (2 = twice the rate)")
    p.add_argument("--ttft-slo-s", type=float, default=2.0, help="TTFT SLO for slo_attainment")
    p.add_argument("--event-delay-ms", type=float, default=5.0, help="worker -> router KV event latency")
    p.add_argument("--event-loss", type=float, default=0.0, help="probability a KV event batch is lost")
    p.add_argument("--seed", type=int, default=0, help="seed for --event-loss")
    t = p.add_argument_group("time model (defaults: Llama-3-8B bf16 on one H100; see router/policies/cost.py)")
    t.add_argument("--prefill-tps", type=float, default=c.prefill_tokens_per_s, help="prefill tokens/s (GEMMs)")
    t.add_argument("--attn-pair-s", type=float, default=c.attn_pair_s, help="seconds per (query, key) pair")
    t.add_argument("--decode-step-s", type=float, default=c.decode_step_s, help="decode step at batch 1")
    t.add_argument("--kv-bytes-per-token", type=int, default=c.kv_bytes_per_token, help="KV bytes per token")
    t.add_argument("--cpu-gbps", type=float, default=c.cpu_gbps, help="CPU tier -> GPU bandwidth")
    t.add_argument("--intra-node-gbps", type=float, default=c.intra_node_gbps, help="GPU -> GPU in a node")
    t.add_argument("--inter-node-gbps", type=float, default=c.inter_node_gbps, help="GPU -> GPU across nodes")
    p.add_argument("--json", action="store_true", help="print one JSON line (no progress bar)")
    p.set_defaults(func=_cmd_simulate)


def _check(args) -> None:
    for name in ("workers", "cache_chunks", "block_tokens", "workers_per_node"):
        if getattr(args, name) < 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be >= 1", param=name)
    for name in ("decode_workers", "cpu_cache_chunks", "ttft_slo_s", "event_delay_ms"):
        if getattr(args, name) < 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be >= 0", param=name)
    if args.limit is not None and args.limit < 1:
        raise InvalidRequestError("--limit must be >= 1", param="limit")
    if args.speedup <= 0 or not 0 <= args.event_loss < 1:
        raise InvalidRequestError("--speedup must be > 0 and --event-loss in [0, 1)")
    for name in ("prefill_tps", "attn_pair_s", "decode_step_s", "kv_bytes_per_token", "cpu_gbps",
                 "intra_node_gbps", "inter_node_gbps"):
        if getattr(args, name) <= 0:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be > 0", param=name)


def config_from_args(args):
    """A ``SimConfig`` from parsed ``simulate`` arguments (validated; typed errors)."""
    from lmdisagg.router.policies.cost import CostModel
    from lmdisagg.sim.simulator import SimConfig
    _check(args)
    cost = CostModel(chunk_tokens=args.block_tokens, kv_bytes_per_token=args.kv_bytes_per_token,
                     prefill_tokens_per_s=args.prefill_tps, attn_pair_s=args.attn_pair_s,
                     decode_step_s=args.decode_step_s, cpu_gbps=args.cpu_gbps,
                     intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps)
    return SimConfig(workers=args.workers, decode_workers=args.decode_workers, policy=args.policy,
                     cache_chunks=args.cache_chunks, cpu_cache_chunks=args.cpu_cache_chunks,
                     workers_per_node=args.workers_per_node, event_delay_s=args.event_delay_ms / 1000,
                     event_loss=args.event_loss, ttft_slo_s=args.ttft_slo_s, seed=args.seed, cost=cost)


def _cmd_simulate(args) -> int:
    from lmdisagg.sim.report import format_table
    from lmdisagg.sim.simulator import Simulator
    from lmdisagg.sim.trace import load_trace
    cfg = config_from_args(args)
    trace = load_trace(args.trace, limit=args.limit, block_tokens=args.block_tokens, speedup=args.speedup)
    report = Simulator(cfg, trace).run(progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(format_table([report]))
        print(f"decisions: {report.reasons}; index: {report.index_stats}")
    return 0
