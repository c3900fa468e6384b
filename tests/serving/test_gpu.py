"""Disaggregated serving on two GPUs (prefill on one, decode on the other) and on one GPU that
both share, deployed through the Python API. The KV moves by cuda_ipc (peer copies), nccl (NCCL;
pulled, or pushed with ``transport.push``) or shm (staged through host memory). Every request
returns exactly the tokens one engine returns, and the KV came over the transport (no recompute),
except over nccl on one GPU, which NCCL cannot pair: there the decode worker recomputes.

The model is the SmolLM2 shape with seeded random weights: the real model cannot be fetched on
a GPU host without a network. Every worker builds the same weights from the seed, so tokens
compare exactly; prompts are token ids (the dummy model has no tokenizer)."""
from __future__ import annotations

import random

import pytest

from lmdisagg.engine import SamplingParams

pytestmark = pytest.mark.gpu
MODEL = "smollm2-135m-dummy"
ENGINE = {"device": "cuda", "dtype": "float32", "chunk_tokens": 16, "kv_cache_bytes": 1 << 28, "max_model_len": 1024}


@pytest.mark.parametrize("transport", ["cuda_ipc", "nccl", "nccl-push", "shm"])
def test_two_gpu_disaggregated_serving_returns_one_engines_tokens(local_ray, transport):
    """nccl-push: the decode worker expects each prompt while it is prefilled, the prefill worker
    pushes its blocks (``transport.push``)."""
    import torch
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from lmdisagg import Pipeline, Role
    from lmdisagg.config import TransportSettings
    from lmdisagg.engine import Engine
    engine = Engine(model=MODEL, **ENGINE)
    rng = random.Random(transport)
    prompts = [[rng.randrange(1000, 40000) for _ in range(n)] for n in (37, 150, 400)]
    push = transport == "nccl-push"
    pipe = Pipeline(model=MODEL, prefill=Role(num_gpus=1), decode=Role(num_gpus=1),
                    transport=TransportSettings(name=transport.removesuffix("-push"), push=push), **ENGINE).start()
    try:
        def gpu_of_worker(worker):  # the GPU this actor placed its engine on (all GPUs are visible)
            return str(torch.cuda.get_device_properties(worker.engine.kv_buffer.device).uuid)
        gpus = local_ray.get([a.__ray_call__.remote(gpu_of_worker) for a in pipe.actors])
        assert len(gpus) == 2 and gpus[0] != gpus[1], gpus  # prefill and decode on different GPUs
        for ids in prompts:
            for kw in ({}, {"temperature": 0.8, "seed": 11}):
                expected = engine.generate(ids, SamplingParams(max_tokens=16, ignore_eos=True, **kw))[0]
                got = pipe.generate(ids, max_tokens=16, ignore_eos=True, **kw)
                assert got.token_ids == expected.token_ids, (len(ids), kw)
        stats = pipe.worker_stats()
        d = stats["decode-0"].stats
        moved, unused = ("pushed_chunks", "pulled_chunks") if push else ("pulled_chunks", "pushed_chunks")
        assert d[moved] > 0 and d[unused] == 0, d
        assert d["transfer_failures"] == 0 and d["recomputed_prompts"] == 0, d
        for s in stats.values():  # every block back in its pool
            assert s.free_blocks == s.total_blocks and s.stats["held"] == 0 and s.running == 0
    finally:
        pipe.shutdown()


@pytest.mark.parametrize("transport", ["cuda_ipc", "shm", "nccl"])
def test_one_gpu_disaggregated_serving_returns_one_engines_tokens(local_ray, transport):
    """Prefill and decode actors sharing one GPU (half each, as ``cluster_configs/1gpu.yaml``):
    cuda_ipc and shm move the KV without loss. nccl cannot pair two processes of one GPU: every
    pull is refused as the pair forms, and the decode worker recomputes each prompt, so the
    tokens are still one engine's and every block is freed."""
    import torch
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a GPU")
    from lmdisagg import Pipeline, Role
    from lmdisagg.engine import Engine
    engine = Engine(model=MODEL, **ENGINE)
    rng = random.Random(transport + "-1gpu")
    prompts = [[rng.randrange(1000, 40000) for _ in range(n)] for n in (37, 400)]
    pipe = Pipeline(model=MODEL, prefill=Role(num_gpus=0.5), decode=Role(num_gpus=0.5), transport=transport,
                    **ENGINE).start()
    try:
        def gpu_of_worker(worker):
            return str(torch.cuda.get_device_properties(worker.engine.kv_buffer.device).uuid)
        gpus = local_ray.get([a.__ray_call__.remote(gpu_of_worker) for a in pipe.actors])
        assert len(set(gpus)) == 1, gpus  # both on one GPU
        for ids in prompts:
            expected = engine.generate(ids, SamplingParams(max_tokens=16, ignore_eos=True))[0]
            assert pipe.generate(ids, max_tokens=16, ignore_eos=True).token_ids == expected.token_ids, len(ids)
        stats = pipe.worker_stats()
        d = stats["decode-0"].stats
        if transport == "nccl":
            assert d["pulled_chunks"] == 0 and d["transfer_failures"] == d["recomputed_prompts"] == len(prompts), d
        else:
            assert d["pulled_chunks"] > 0 and d["transfer_failures"] == 0 and d["recomputed_prompts"] == 0, d
        for s in stats.values():
            assert s.free_blocks == s.total_blocks and s.stats["held"] == 0 and s.running == 0
    finally:
        pipe.shutdown()


@pytest.mark.parametrize("transport", ["cuda_ipc", "nccl", "nccl-push", "shm"])
def test_decode_worker_killed_mid_stream_on_gpus(local_ray, transport):
    """A decode worker's process SIGKILLed mid-stream (its GPU memory, IPC handles and NCCL pair
    with the prefill worker go with it): the request is resumed on the other decode worker, the
    prefill worker serves the new pull (nccl-push: pushes into its new expectation, over another
    NCCL pair) over the same transport, and the tokens are one engine's."""
    import os
    import signal

    import torch
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from lmdisagg import Pipeline, Role
    from lmdisagg.config import TransportSettings
    from lmdisagg.engine import Engine
    engine = Engine(model=MODEL, **ENGINE)
    ids = [random.Random(transport).randrange(1000, 40000) for _ in range(150)]
    n = 300
    expected = engine.generate(ids, SamplingParams(max_tokens=n, ignore_eos=True))[0]
    push = transport == "nccl-push"
    pipe = Pipeline(model=MODEL, prefill=Role(num_gpus=1), decode=Role(replicas=2, num_gpus=0.5),
                    transport=TransportSettings(name=transport.removesuffix("-push"), push=push), **ENGINE).start()
    try:
        who = dict(local_ray.get([a.__ray_call__.remote(lambda w: (w.worker_id, os.getpid())) for a in pipe.actors]))
        got, victim = [], None
        for d in pipe.stream(ids, max_tokens=n, ignore_eos=True):
            got += d.token_ids
            if victim is None and len(got) >= 8:
                busy = [wid for wid, s in pipe.worker_stats().items() if wid.startswith("decode") and s.running]
                assert len(busy) == 1, busy
                victim = busy[0]
                os.kill(who[victim], signal.SIGKILL)
        assert victim is not None and got == expected.token_ids
        migrated = pipe.router.metrics.registry.get_sample_value("lmdisagg_request_migrations_total", {"role": "decode"})
        assert migrated == 1
        alive = [a for a in pipe.actors if a is not pipe.actors[list(who).index(victim)]]
        stats = {s.worker_id: s for s in local_ray.get([a.load.remote() for a in alive], timeout=30)}
        survivor = stats[next(w for w in stats if w.startswith("decode"))]
        moved = "pushed_chunks" if push else "pulled_chunks"
        assert survivor.stats[moved] > 0 and survivor.stats["recomputed_prompts"] == 0, survivor.stats
        for s in stats.values():  # nothing of the moved request left allocated
            assert s.free_blocks == s.total_blocks and s.stats["held"] == 0 and s.running == 0, s
    finally:
        pipe.shutdown()
