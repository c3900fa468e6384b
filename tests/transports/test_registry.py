"""The registry and descriptors: lazy imports, names, wire format."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from lmdisagg.transports import TRANSPORTS, BufferDesc, ChunkDesc, TransferError, create_transport, transport_class

HEAVY_LIBS = ("libcuda", "libnccl", "libibverbs", "libtorch", "libcudart")


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          timeout=120).stdout


def test_importing_the_package_loads_no_heavy_library():
    out = _run(
        "import sys, lmdisagg, lmdisagg.transports\n"
        "maps = open('/proc/self/maps').read()\n"
        f"print(sorted(m for m in ('torch', 'mooncake') if m in sys.modules), "
        f"sorted(l for l in {HEAVY_LIBS!r} if l in maps))\n")
    assert out.strip() == "[] []"


def test_creating_a_transport_loads_its_library_only_then():
    out = _run(
        "import sys\n"
        "from lmdisagg.transports import create_transport\n"
        "before = 'mooncake' in sys.modules\n"
        "create_transport('mooncake').close()\n"
        "print(before, 'mooncake' in sys.modules, 'libibverbs' in open('/proc/self/maps').read())\n")
    assert out.split()[-3:] == ["False", "True", "True"]


def test_every_name_resolves_and_unknown_names_are_refused():
    for name in TRANSPORTS:
        assert transport_class(name).name == name
    with pytest.raises(ValueError, match="unknown transport 'carrier-pigeon'"):
        create_transport("carrier-pigeon")


def test_descriptor_round_trips_through_msgpack():
    buf = BufferDesc("shm", "shm-host-1-0", 3, 1 << 30, "lmdisagg-1-2-abc", b"\x91\x00", "host", 1, 2)
    desc = ChunkDesc(buf, (4, 9, 2), 1 << 20, (1, 2, 3))
    assert ChunkDesc.unpack(desc.pack()) == desc
    assert ChunkDesc.unpack(dataclasses.replace(desc, checksums=()).pack()).checksums == ()


def test_misuse_raises_at_once():
    import torch
    with create_transport("shm") as tx:
        src = tx.register(tx.allocate((4, 64), torch.uint8, "cpu"))
        dst = tx.register(torch.zeros(4, 64, dtype=torch.uint8))
        with pytest.raises(TransferError, match="outside"):
            tx.describe(src, [4], 64)
        desc = tx.describe(src, [0, 1], 64)
        with pytest.raises(TransferError, match="2 source blocks but 1"):
            tx.pull(desc, dst, [0])
        with pytest.raises(TransferError, match="outside"):
            tx.pull(desc, dst, [3, 4])
        with pytest.raises(TransferError, match="transport 'shm' given to 'fake'"):
            create_transport("fake").pull(desc, dst, [0, 1])
        with pytest.raises(TransferError, match="contiguous"):
            tx.register(torch.zeros(4, 64)[:, ::2])


def test_cpu_media_are_all_available_here():
    from lmdisagg.transports import available_transports
    assert set(available_transports("cpu")) == {"shm", "fake", "nccl", "mooncake"}
