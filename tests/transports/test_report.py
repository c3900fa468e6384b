"""``lmdisagg transports``: the report of what each transport gives on this machine matches what
the transports do when a worker makes them here, and says why one does not load."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch

from lmdisagg.transports import TRANSPORTS
from lmdisagg.transports.nccl import cupy_nccl


def _cli(*args: str, block: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{block}from lmdisagg.cli import main\nsys.exit(main({list(args)!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)


def test_the_report_says_what_each_transport_gives_here():
    r = json.loads(_cli("transports", "--json").stdout)
    t = r["transports"]
    assert set(t) == set(TRANSPORTS)
    assert t["shm"]["available"] and 0 < t["shm"]["dev_shm_free_bytes"] <= shutil.disk_usage("/dev/shm").total
    assert t["fake"]["available"]
    cuda = torch.cuda.is_available()
    assert t["cuda_ipc"]["available"] == cuda
    if not cuda:
        assert "needs CUDA devices" in t["cuda_ipc"]["why_not"]
    nccl, _ = cupy_nccl()
    assert t["nccl"]["available"] and t["nccl"]["backend"] == ("nccl" if cuda else "gloo")
    # it pushes on gloo and through cupy's NCCL, not through a torch NCCL group
    assert t["nccl"]["push"] == ("no" if cuda and t["nccl"]["runtime"] == "torch" else "yes")
    if not cuda:  # NCCL buffer registration needs the cupy runtime on CUDA
        assert t["nccl"]["registered"] == "no"
    if cuda:
        assert t["nccl"]["runtime"] == ("cupy" if nccl is not None else "torch")
        assert bool(t["nccl"].get("warnings")) == (nccl is None)  # the slower path is named
    else:
        assert t["nccl"]["runtime"] == "torch" and "warnings" not in t["nccl"]  # gloo: no slower path
    try:
        import mooncake.engine  # noqa: F401
    except ImportError:
        assert not t["mooncake"]["available"]
    else:
        assert t["mooncake"]["available"] and t["mooncake"]["version"]
    assert r["cuda"] == torch.version.cuda and len(r["gpus"]) == torch.cuda.device_count()
    text = _cli("transports").stdout.splitlines()
    for name in TRANSPORTS:  # one line each, ok or -- with the reason
        [line] = [s for s in text if s.split()[:1] == [name]]
        assert line.split()[1] == ("ok" if t[name]["available"] else "--"), line


def test_a_transport_that_does_not_load_is_reported_with_the_fix_not_a_crash():
    out = _cli("transports", "--json", block="sys.modules['mooncake'] = None  # as where it is not installed\n")
    t = json.loads(out.stdout)["transports"]
    assert not t["mooncake"]["available"]
    assert "pip install 'lmdisagg[mooncake]'" in t["mooncake"]["why_not"]
    assert t["shm"]["available"]  # the others are still reported


def test_a_broken_cuda_setup_is_reported_not_a_crash():
    """CUDA that claims to be there but fails when asked (a driver that does not match torch):
    the report says so, and still covers every transport."""
    broken = ("import torch\n"
              "torch.cuda.is_available = lambda: True\n"
              "def _fail(*a, **k):\n"
              "    raise RuntimeError('CUDA driver initialization failed')\n"
              "torch.cuda.device_count = _fail\n")
    # counting fails; or counting works and the peer-access query fails (GPUs named, no matrix)
    late = ("import torch\n"
            "torch.cuda.is_available = lambda: True\n"
            "torch.cuda.device_count = lambda: 2\n"
            "torch.cuda.get_device_name = lambda i: f'GPU {i}'\n"
            "def _fail(*a, **k):\n"
            "    raise RuntimeError('CUDA driver initialization failed')\n"
            "torch.cuda.can_device_access_peer = _fail\n")
    for block in (broken, late):
        r = json.loads(_cli("transports", "--json", block=block).stdout)
        assert "CUDA driver initialization failed" in r["gpu_error"]
        assert set(r["transports"]) == set(TRANSPORTS) and r["transports"]["shm"]["available"]
        assert "GPUs could not be queried" in _cli("transports", block=block).stdout
