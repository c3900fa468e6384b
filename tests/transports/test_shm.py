"""Shared memory specifics: the engine's cache lives in a segment (no staging copy), a mirror for
memory the transport did not allocate, and cleanup after a crashed owner."""
from __future__ import annotations

import os

import torch

from lmdisagg.engine import Engine, SamplingParams
from lmdisagg.transports import create_transport
from lmdisagg.transports._blocks import block_checksums
from tests.transports.conftest import Peer


def test_engine_cache_lives_in_a_segment():
    with create_transport("shm") as tx:
        engine = Engine(model="smollm2-135m", chunk_tokens=16, num_blocks=32, max_model_len=256,
                        kv_allocator=tx.allocate)
        buf = tx.register(engine.kv_buffer)
        assert "mirror" not in buf.state  # zero copy: peers read the cache itself
        path = os.path.join("/dev/shm", buf.desc.address)
        assert os.path.getsize(path) == engine.kv_buffer.numel() * engine.kv_buffer.element_size()
        # the engine runs on that memory, and a puller sees what it wrote
        prompt = list(range(100, 170))  # 4 full chunks + 6 tokens
        engine.generate(prompt, SamplingParams(max_tokens=1))
        ids = engine.pin_chunks(engine.chunk_keys(prompt))
        desc = tx.describe(buf, ids, engine.layout.chunk_nbytes)
        dst = tx.register(torch.zeros(len(ids), engine.layout.chunk_nbytes, dtype=torch.uint8))
        tx.pull(desc, dst, range(len(ids))).wait(10)
        assert block_checksums(dst.flat, range(len(ids)), engine.layout.chunk_nbytes) == \
            block_checksums(buf.flat, ids, engine.layout.chunk_nbytes)
        engine.unpin_chunks(ids)
    assert not os.path.exists(path)  # unlinked on close; the engine keeps its mapping
    assert engine.generate(prompt, SamplingParams(max_tokens=1))[0].cached_tokens == 64


def test_foreign_memory_goes_through_a_mirror_segment():
    with create_transport("shm") as src_tx, create_transport("shm") as dst_tx:
        plain = torch.arange(8 * 256, dtype=torch.int32).view(8, 256)  # not from tx.allocate
        src = src_tx.register(plain)
        desc = src_tx.describe(src, [6, 1], 1024)
        assert os.path.exists(os.path.join("/dev/shm", src.state["mirror"]))
        out = torch.zeros(2, 256, dtype=torch.int32)
        dst_tx.pull(desc, dst_tx.register(out), [0, 1]).wait(10)
        assert torch.equal(out[0], plain[6]) and torch.equal(out[1], plain[1])


def test_segments_of_a_crashed_process_are_removed():
    p = Peer("shm")
    try:
        p.call("raw", 1 << 20, 0)
        pid = p.call("pid")
        mine = lambda: [n for n in os.listdir("/dev/shm") if n.startswith(f"lmdisagg-{pid}-")]  # noqa: E731
        assert mine()
        p.kill()
        assert mine()  # nobody unlinked them: the owner died
        create_transport("shm").close()  # any new transport on the node sweeps them
        assert not mine()
    finally:
        p.stop()
