"""CUDA paths of the store: pinned L2, disk and Redis reads straight into GPU blocks, offloads
from GPU blocks (side streams). Run on the GPU host: ``pytest tests/store/test_gpu.py``."""
from __future__ import annotations

import random
import shutil

import pytest

from lmdisagg.engine import Engine, SamplingParams
from lmdisagg.kv.store import StoreBridge, TieredStore, store_namespace
from lmdisagg.kv.store.disk import DiskTier
from lmdisagg.kv.store.host import HostTier

pytestmark = pytest.mark.gpu
T = 16
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


def test_cuda_engine_reuses_chunks_from_every_tier(tmp_path, namespace, request):
    # fp32: a hit's attention runs other kernels than a full prefill, and in bf16 a random
    # model's near-tied logits could then pick another token without anything being wrong
    e = Engine(model="smollm2-135m-dummy", device="cuda", dtype="float32", chunk_tokens=T, num_blocks=9,
               max_model_len=9 * T)
    rng = random.Random(0)
    p, q = ([rng.randrange(100, 40000) for _ in range(8 * T + 3)] for _ in range(2))
    ns = store_namespace(e)
    tiers = [HostTier(1 << 28), DiskTier(tmp_path, ns, 1 << 28)]
    if shutil.which("redis-server"):
        from lmdisagg.kv.store.redis_tier import RedisTier
        tiers.append(RedisTier(request.getfixturevalue("redis_server").url, namespace))
    store = TieredStore(tiers)
    bridge = StoreBridge(e, store, load_timeout_s=30, skip_slow_tiers=False)

    def once(prompt):
        (res, load), = bridge.generate([prompt], PARAMS)
        assert bridge.flush(60)
        return res, load

    ref = once(p)[0]
    once(q)
    assert all(t.is_pinned() for t in tiers[0]._data.values())  # L2 is page-locked on CUDA
    names = [t.name for t in tiers]
    for i, name in enumerate(names):
        # drop p from the tiers above `name`, evict it from the engine, and load it from `name`
        for k in e.chunk_keys(p):
            for t in tiers[:i]:
                t.remove(k)
        once(q)
        res, load = once(p)
        assert load.served == {name: 8}, (name, load)
        assert res.token_ids == ref.token_ids and res.cached_tokens == 8 * T
    bridge.close()
    store.close()
    assert e.blocks.num_free == e.blocks.num_blocks
