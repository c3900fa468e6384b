"""KV event messages and the worker-side batcher, ending with a real engine feeding the index."""
from __future__ import annotations

import os
import random

import pytest

from lmdisagg.router.events import EventBatcher, EventDecodeError, KVEventBatch
from lmdisagg.router.index import ChunkIndex
from lmdisagg.router.policy import WorkerLoad


def _key(rng: random.Random) -> bytes:
    return rng.randbytes(16)


def test_batch_msgpack_roundtrip():
    rng = random.Random(0)
    b = KVEventBatch("w1", 7, [(_key(rng), "gpu"), (_key(rng), "cpu")], [(_key(rng), "l3")], False)
    back = KVEventBatch.from_msgpack(b.to_msgpack())
    assert back == b and isinstance(back.stored[0], tuple)
    load = WorkerLoad("w1", 1234, 3, 10, 20, 2, "node0")
    assert WorkerLoad.from_msgpack(load.to_msgpack()) == load


@pytest.mark.parametrize("payload", [
    b"\xc1",                                            # not msgpack
    b"\x93\x01\x02\x03",                                # wrong arity
    KVEventBatch("w", -1).to_msgpack(),                 # negative seq
    KVEventBatch("w", 0, [(b"k" * 16, "tape")]).to_msgpack(),   # unknown tier
])
def test_malformed_batches_raise_typed_error(payload):
    with pytest.raises(EventDecodeError):
        KVEventBatch.from_msgpack(payload)


def test_batcher_numbers_and_coalesces():
    rng = random.Random(1)
    a, b, c = (_key(rng) for _ in range(3))
    bt = EventBatcher("w")
    bt.add([("stored", a), ("stored", b), ("evicted", b)])   # b came and went inside one window
    first = bt.flush()
    assert first.seq == 0 and first.stored == [(a, "gpu")] and first.evicted == []
    assert bt.flush() is None                               # nothing new: no seq burnt
    bt.add([("evicted", a), ("stored", c)])
    bt.add([("stored", a)], tier="cpu")                      # a moved down a tier
    second = bt.flush()
    assert second.seq == 1
    assert sorted(second.stored) == sorted([(c, "gpu"), (a, "cpu")]) and second.evicted == [(a, "gpu")]
    snap = bt.resync()
    assert snap.resync and snap.seq == 2 and sorted(snap.stored) == sorted([(c, "gpu"), (a, "cpu")])
    with pytest.raises(EventDecodeError):
        bt.add([("moved", a)])


def test_engine_events_through_batcher_mirror_engine_cache():
    """A real engine under eviction pressure: after every step its drained events, batched and
    applied, leave the index holding exactly the engine's cached chunk keys."""
    from lmdisagg.engine import Engine, SamplingParams
    eng = Engine(model="smollm2-135m", chunk_tokens=16, num_blocks=16, max_model_len=256)
    eng.enable_kv_events()
    index, bt = ChunkIndex(), EventBatcher("w0")
    index.add_worker("w0")
    rng = random.Random(2)
    heads = [[rng.randrange(100, 20000) for _ in range(48)] for _ in range(3)]
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    batches = 0
    for i in range(4):
        prompts = [heads[(i + j) % 3] + [rng.randrange(100, 20000) for _ in range(rng.randrange(5, 60))]
                   for j in range(2)]
        for j, p in enumerate(prompts):
            eng.add_request(f"r{i}.{j}", p, params)
        while eng.has_unfinished():
            eng.step()
            bt.add(eng.drain_kv_events())
            batch = bt.flush()
            if batch is not None:
                res = index.apply(KVEventBatch.from_msgpack(batch.to_msgpack()))
                assert res.accepted and not res.need_resync
                batches += 1
        assert set(index.keys_of("w0")) == set(eng.blocks.by_key)
        for p in prompts + heads:
            keys = eng.chunk_keys(p)
            assert index.matched_prefix("w0", keys).chunks == eng.cached_prefix(keys)
    assert index.stats.evicted > 0, "the pool was meant to be small enough to evict"
    assert index.stats.batches == batches and index.stats.rejected_out_of_order == 0
    assert eng.blocks.num_free == eng.blocks.num_blocks  # nothing leaked
