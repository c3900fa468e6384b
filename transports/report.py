"""What each transport gives on this machine: ``lmdisagg transports [--json]``.

Each transport is made with its default options and closed again (the same constructor a worker
runs), so the report says what a worker here would get: whether the medium loads, how it
launches (cupy or torch), and any slower-path warning it logs on the way. Mooncake is only
imported: an engine listens on every interface, so none is started for a report. Nothing is
sent to any peer.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import shutil

from lmdisagg.transports.registry import TRANSPORTS, create_transport


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _warnings():
    """The warnings the transports log meanwhile (and only here, not on the console twice)."""
    logger = logging.getLogger("lmdisagg.transports")
    keep, propagate = _Keep(), logger.propagate
    logger.addHandler(keep)
    logger.propagate = False
    try:
        yield keep.messages
    finally:
        logger.removeHandler(keep)
        logger.propagate = propagate


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cupy() -> dict:
    try:
        import cupy
    except Exception as e:  # ImportError, or CUDA libraries that do not load
        return {"version": None, "why_not": f"{type(e).__name__}: {e}"}
    return {"version": cupy.__version__}


def _gpus() -> dict:
    import torch
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": []}
    try:
        if not torch.cuda.is_available():
            return out
        n = torch.cuda.device_count()
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(n)]
        # a cross-GPU cuda_ipc pull runs peer to peer only where the source's GPU reaches ours
        out["peer_access"] = [[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(n)]
                              for i in range(n)]
    except Exception as e:  # a broken driver or device: when this report is wanted most
        out["gpu_error"] = f"{type(e).__name__}: {e}"
        return out
    with contextlib.suppress(Exception):
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return out


def _details(name: str, tx) -> dict:
    if name == "shm":
        usage = shutil.disk_usage("/dev/shm")
        return {"dev_shm_free_bytes": usage.free}
    if name == "cuda_ipc":
        return {"launcher": tx.launcher.name}
    if name == "nccl":
        return {"backend": tx.backend, "runtime": tx.runtime, "push": "yes" if tx.supports_push else "no",
                "registered": "yes" if tx.registers_memory else "no"}  # pairs of allocate'd caches, zero-copy
    return {}


def report() -> dict:
    """Per transport: ``available``, then its launch details or ``why_not``, and ``warnings``."""
    out = {**_gpus(), "cupy": _cupy(), "transports": {}}
    for name in TRANSPORTS:
        entry: dict = {"available": False}
        with _warnings() as warned:
            try:
                if name == "mooncake":
                    from lmdisagg.transports.mooncake import _engine_class
                    _engine_class()
                    entry.update(version=_version("mooncake-transfer-engine-non-cuda")
                                 or _version("mooncake-transfer-engine"),
                                 protocols="tcp; rdma by config, where RDMA NICs are")
                else:
                    tx = create_transport(name)
                    try:
                        entry.update(_details(name, tx))
                    finally:
                        tx.close()
                entry["available"] = True
            except Exception as e:  # the reason is the report
                entry["why_not"] = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
        if warned:
            entry["warnings"] = list(warned)
        out["transports"][name] = entry
    return out


def format_report(r: dict) -> str:
    gpus = r["gpus"]
    head = (f"torch {r['torch']} (CUDA {r['cuda'] or 'none'}), {len(gpus)} GPU(s)"
            + (f": {', '.join(gpus)}" if gpus else "")
            + (f", NCCL {r['nccl']}" if r.get("nccl") else "")
            + f"; cupy {r['cupy']['version'] or 'not loaded (' + r['cupy']['why_not'] + ')'}")
    lines = [head]
    if r.get("gpu_error"):
        lines.append(f"GPUs could not be queried: {r['gpu_error']}")
    if len(gpus) > 1 and r.get("peer_access"):  # absent when querying it failed (gpu_error)
        lines.append("peer access (row reaches column): "
                     + "; ".join(f"GPU{i}: " + " ".join("y" if ok else "n" for ok in row)
                                 for i, row in enumerate(r["peer_access"])))
    for name, e in r["transports"].items():
        if e["available"]:
            info = ", ".join(f"/dev/shm {v / 2**30:.1f} GiB free" if k == "dev_shm_free_bytes" else f"{k} {v}"
                             for k, v in e.items() if k not in ("available", "warnings"))
            lines.append(f"  {name:9s} ok   {info}")
        else:
            lines.append(f"  {name:9s} --   {e['why_not']}")
        for w in e.get("warnings", ()):
            lines.append(f"  {'':9s} !    {w}")
    return "\n".join(lines)
