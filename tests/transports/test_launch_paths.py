"""Launch paths: a CUDA medium left on runtime="auto" launches through cupy where it loads, and
says so, with the cost and the fix, where it falls back to torch (never silently)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lmdisagg.transports import create_transport
from tests.transports.conftest import gpu

SLOW = "runtime='torch'"  # in the warning, never in other messages of the transports


def test_nccl_without_cupy_says_it_takes_the_slower_torch_path(caplog):
    """runtime="auto" on CUDA buffers runs NCCL through cupy where it loads; where it does not,
    the transport says so (and how to fix it) rather than silently taking the torch group's
    ~60-90 µs per window. Choosing runtime="torch" says nothing."""
    from lmdisagg.transports.nccl import cupy_nccl
    nccl, why = cupy_nccl()
    with caplog.at_level("WARNING", logger="lmdisagg.transports"):
        tx = create_transport("nccl", backend="nccl", runtime="auto")
        tx.close()
    slow = [r.getMessage() for r in caplog.records if SLOW in r.getMessage()]
    if nccl is None:
        assert tx.runtime == "torch"
        assert len(slow) == 1 and "lmdisagg[cu" in slow[0] and why in slow[0], slow
    else:
        assert tx.runtime == "cupy" and not slow, slow
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmdisagg.transports"):
        create_transport("nccl", backend="nccl", runtime="torch").close()
    assert not [r for r in caplog.records if SLOW in r.getMessage()]


@gpu
def test_cuda_ipc_without_cupy_says_it_takes_the_slower_torch_path():
    """In a fresh process where cupy cannot be imported (as on a machine without it), cuda_ipc
    warns and launches through torch; with cupy there it warns nothing and uses cupy."""
    pytest.importorskip("cupy")
    code = ("import logging, sys\n"
            "{block}"
            "logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format='%(message)s')\n"
            "from lmdisagg.transports import create_transport\n"
            "tx = create_transport('cuda_ipc')\n"
            "print('LAUNCHER', tx.launcher.name)\n"
            "tx.close()\n")
    for blocked, launcher in ((True, "torch"), (False, "cupy")):
        out = subprocess.run([sys.executable, "-c", code.format(block="sys.modules['cupy'] = None\n" if blocked else "")],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        assert f"LAUNCHER {launcher}" in out, out
        slow = [line for line in out.splitlines() if SLOW in line]
        if blocked:
            assert len(slow) == 1 and "cuda_ipc: cupy does not load" in slow[0] and "lmdisagg[cu" in slow[0], out
        else:
            assert not slow, out
