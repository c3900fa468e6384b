"""Probe: where an engine decode step's host time goes on CUDA (smollm2-135m-dummy, bf16), B = 1 and 8."""
import cProfile, pstats, io, time, sys, os
import torch
sys.path.insert(0, os.getcwd())
from lmdisagg.engine import Engine, SamplingParams

e = Engine(model="smollm2-135m-dummy", device="cuda", dtype="bfloat16", kv_cache_bytes=2 << 30)
out = os.environ.get("OUT", "/tmp")
for B in (1, 8):
    for sampled in (False, True):
        ids = [[int(x) for x in torch.randint(0, 49152, (128,))] for _ in range(B)]
        kw = dict(temperature=0.8, seed=1) if sampled else {}
        for i, p in enumerate(ids):
            e.add_request(f"w{B}{sampled}{i}", p, SamplingParams(max_tokens=40, ignore_eos=True, **kw))
        while e.has_unfinished():
            e.step()
        for i, p in enumerate(ids):
            e.add_request(f"r{B}{sampled}{i}", [t + 1 for t in p], SamplingParams(max_tokens=300, ignore_eos=True, **kw))
        e.step()  # prefill
        torch.cuda.synchronize()
        n = 0
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        while e.has_unfinished():
            e.step(); n += 1
        pr.disable()
        dt = time.perf_counter() - t0
        # same again without the profiler
        for i, p in enumerate(ids):
            e.add_request(f"s{B}{sampled}{i}", [t + 2 for t in p], SamplingParams(max_tokens=300, ignore_eos=True, **kw))
        e.step(); torch.cuda.synchronize()
        m = 0; t1 = time.perf_counter()
        while e.has_unfinished():
            e.step(); m += 1
        dt2 = time.perf_counter() - t1
        print(f"B={B} sampled={sampled}: {dt2 / m * 1e3:.3f} ms/step unprofiled ({m} steps); profiled {dt / n * 1e3:.3f}")
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue()[:6000])
