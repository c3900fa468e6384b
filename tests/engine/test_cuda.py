"""The engine on CUDA (Triton kernels, SDPA prefill, CUDA-graph decode and short prefill) against HF
transformers on CUDA, and graph-replayed steps against the same steps run eagerly.

Parity model: SmolLM2-135M when it is already fetched; otherwise (the GPU host has no network)
a random-weight model of SmolLM2's shape in HF format, which both engines load from one
directory. In fp32 we check each greedy token by teacher forcing: HF's logits on prompt + our
tokens must put our token within 1e-3 of its best logit at every position. Rounding in fp32
moves logits by ~1e-5, so this holds for a correct engine and fails for a wrong one; it does not
fail on the near-ties of a random model the way exact sequence equality could.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from lmdisagg.engine import Engine, SamplingParams
from lmdisagg.models import resolve_model
from lmdisagg.models.registry import DUMMY_SHAPES
from tests.engine.random_llama import write_random_llama

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def parity_dir(tmp_path_factory):
    real = resolve_model("smollm2-135m", fetch=False).path
    if (real / "model.safetensors").is_file():
        return real
    return write_random_llama(tmp_path_factory.mktemp("smollm2-shaped"), DUMMY_SHAPES["smollm2-135m-dummy"])


@pytest.fixture(scope="module")
def cuda_engine(parity_dir):
    e = Engine(model=str(parity_dir), device="cuda", dtype="float32", kv_cache_bytes=1 << 30, max_num_seqs=16)
    yield e
    assert not e.has_unfinished() and e.blocks.num_free == e.blocks.num_blocks


@pytest.fixture(scope="module")
def hf_cuda(parity_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(parity_dir), dtype=torch.float32).cuda().eval()


def random_ids(n: int, seed: int, vocab: int = 49152) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n,), generator=g).tolist()


def assert_hf_greedy(hf, prompt: list[int], ours: list[int], tol: float = 1e-3) -> None:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ours], device="cuda")).logits[0, len(prompt) - 1:-1].float()
    chosen = logits.gather(1, torch.tensor(ours, device="cuda")[:, None])[:, 0]   # [n]
    gap = logits.max(-1).values - chosen
    assert gap.max().item() <= tol, f"token {int(gap.argmax())} is {gap.max().item():.4f} below HF's best"


def test_greedy_tokens_match_hf(cuda_engine, hf_cuda):
    prompts = [random_ids(n, seed=n) for n in (6, 40, 300, 700)]
    results = cuda_engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    assert cuda_engine.runner.graphs is not None and cuda_engine.runner.graphs.graphs  # decode replayed graphs
    for p, r in zip(prompts, results):
        assert len(r.token_ids) == 24
        assert_hf_greedy(hf_cuda, p, r.token_ids)


def test_a_step_waiting_for_its_tokens_leaves_other_threads_cuda_calls_free(cuda_engine):
    """A decode worker pulls KV on another thread while its engine steps. The step's wait for its
    sampled tokens must not hold up that thread's CUDA calls: read with ``.tolist()``, it kept the
    GIL until the step's kernels ended, and a pull's launch (cupy takes the GIL back after each
    driver call) waited for it."""
    from lmdisagg.transports import create_transport
    block = 2 << 20
    tx = create_transport("cuda_ipc")
    try:
        src = tx.register(torch.ones(4 * block, dtype=torch.uint8, device="cuda"))
        dst = tx.register(torch.zeros(4 * block, dtype=torch.uint8, device="cuda"))
        desc = tx.describe(src, [0, 1, 2, 3], block)
        side = torch.cuda.Stream()  # an idle stream, as a decode worker's
        with torch.cuda.stream(side):
            tx.pull(desc, dst, [0, 1, 2, 3]).wait(30)  # a worker's transport is warm (streams made)
            dst.flat.zero_()
        # a worker's engine has stepped before (a fresh engine's first step stalled the other
        # thread too, once: first-use setup, not looked into further)
        cuda_engine.generate([random_ids(8, seed=4)], SamplingParams(max_tokens=2, ignore_eos=True))
        cuda_engine.add_request("behind-a-long-kernel", random_ids(20, seed=5),
                                SamplingParams(max_tokens=1, ignore_eos=True))
        launch: list[float] = []

        def pull():
            time.sleep(0.2)  # the step is waiting for its tokens by now
            with torch.cuda.stream(side):
                t0 = time.perf_counter()
                x = tx.pull(desc, dst, [0, 1, 2, 3])
                launch.append(time.perf_counter() - t0)
            x.wait(30)
        th = threading.Thread(target=pull)
        torch.cuda._sleep(1_500_000_000)  # ~0.75 s on the engine's stream, ahead of its step
        th.start()
        t0 = time.perf_counter()
        while cuda_engine.has_unfinished():
            cuda_engine.step()
        step_s = time.perf_counter() - t0
        th.join(30)
        assert torch.equal(dst.flat, src.flat)
    finally:
        tx.close()
    assert step_s > 0.4  # the step did wait for the long kernel
    assert launch and launch[0] < 0.1, f"the pull's launch took {launch[0]:.3f} s, behind the step's token read"


def test_prefix_cache_hit_matches_hf(cuda_engine, hf_cuda):
    t = cuda_engine.config.chunk_tokens
    prefix = random_ids(2 * t + 90, seed=11)
    a, b = prefix + random_ids(30, seed=12), prefix + random_ids(50, seed=13)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    ra = cuda_engine.generate(a, params)[0]
    rb = cuda_engine.generate(b, params)[0]
    assert ra.cached_tokens == 0 and rb.cached_tokens == 2 * t   # b's prefill reads 2 chunks back
    assert_hf_greedy(hf_cuda, a, ra.token_ids)
    assert_hf_greedy(hf_cuda, b, rb.token_ids)
    steps = cuda_engine.runner.prefill_graphs.steps
    rc = cuda_engine.generate(prefix + random_ids(7, seed=14), params)[0]  # a short suffix: graph prefill
    assert rc.cached_tokens == 2 * t and cuda_engine.runner.prefill_graphs.steps == steps + 1
    assert_hf_greedy(hf_cuda, prefix + random_ids(7, seed=14), rc.token_ids)


def test_logprobs_match_hf(cuda_engine, hf_cuda):
    """Logprobs computed on the GPU (graph decode steps, and a graph prefill after a cache hit)
    equal HF's log_softmax, for the sampled token and the top alternatives."""
    t = cuda_engine.config.chunk_tokens
    prefix = random_ids(t + 40, seed=21)
    cuda_engine.generate(prefix, SamplingParams(max_tokens=1))  # cache its first chunk
    prompt = prefix + random_ids(9, seed=22)
    k = 4
    r = cuda_engine.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True, logprobs=k))[0]
    assert r.cached_tokens == t and len(r.logprobs) == 10
    with torch.no_grad():
        lsm = torch.log_softmax(hf_cuda(torch.tensor([prompt + r.token_ids], device="cuda")).logits[0].float(), -1)
    for j, (tok, (lp, top)) in enumerate(zip(r.token_ids, r.logprobs)):
        row = lsm[len(prompt) - 1 + j]
        assert lp == pytest.approx(row[tok].item(), abs=2e-3)
        # HF's k largest values, and each named alternative's value is HF's for that token
        # (near-ties, common with random weights, may name other tokens than HF's topk)
        assert [v for _, v in top] == pytest.approx(row.topk(k).values.tolist(), abs=2e-3)
        assert [row[a].item() for a, _ in top] == pytest.approx([v for _, v in top], abs=2e-3)


def test_prompt_logprobs_match_hf(cuda_engine, hf_cuda):
    """Prompt logprobs on the GPU (the prompt is then prefilled eagerly, whole, even when cached),
    in slices of rows, equal HF's log_softmax."""
    t = cuda_engine.config.chunk_tokens
    prompt = random_ids(t + 300, seed=41)  # more rows than one slice of full-vocabulary logits
    cuda_engine.generate(prompt, SamplingParams(max_tokens=1))
    r = cuda_engine.generate(prompt, SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=3))[0]
    assert r.cached_tokens == 0 and len(r.prompt_logprobs) == len(prompt) and r.prompt_logprobs[0] is None
    with torch.no_grad():
        lsm = torch.log_softmax(hf_cuda(torch.tensor([prompt], device="cuda")).logits[0].float(), -1)
    got = torch.tensor([lp for lp, _ in r.prompt_logprobs[1:]], device="cuda")
    want = lsm[:-1].gather(1, torch.tensor(prompt[1:], device="cuda")[:, None])[:, 0]
    assert (got - want).abs().max().item() < 2e-3
    tops = torch.tensor([[v for _, v in top] for _, top in r.prompt_logprobs[1:]], device="cuda")
    assert (tops - lsm[:-1].topk(3).values).abs().max().item() < 2e-3


def test_logits_processing_on_the_gpu(cuda_engine):
    """logit_bias, penalties, top_k and min_p run on the GPU's logits (graph decode steps)."""
    prompt = random_ids(30, seed=31)
    greedy = cuda_engine.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    forced = cuda_engine.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True,
                                                         logit_bias=((1234, 100.0),)))[0].token_ids
    assert forced == [1234] * 8
    # a frequency penalty of 2 per use against a bias of 100: the token still wins (100 - 2 * 7 > others)
    pen = cuda_engine.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True, frequency_penalty=2.0,
                                                      logit_bias=((1234, 100.0),)))[0].token_ids
    assert pen == [1234] * 8
    # a -100 ban holds (with a presence penalty on the tokens that do appear)
    banned = cuda_engine.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True, presence_penalty=-2.0,
                                                         logit_bias=((greedy[0], -100.0),)))[0].token_ids
    assert greedy[0] not in banned
    # min_tokens: a stop token waits (greedy[2] would end the request at its third token)
    stop = SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=(greedy[2],))
    assert len(cuda_engine.generate(prompt, stop)[0].token_ids) <= 3
    held = cuda_engine.generate(prompt, SamplingParams(**{**stop.__dict__, "min_tokens": 8}))[0].token_ids
    assert len(held) == 8 and greedy[2] not in held
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = cuda_engine.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.5, seed=2,
                                                        **extra))[0]
        assert r.token_ids == greedy, extra


def test_seeded_sampling_repeats_on_the_gpu(cuda_engine):
    """Sampled rows are drawn on the GPU from each request's own generator: the same seed gives
    the same tokens (the engine's device is "cuda", without an index), another seed others."""
    prompt = random_ids(20, seed=41)
    sp = SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, top_p=0.95, seed=5)
    a, b = (cuda_engine.generate(prompt, sp)[0].token_ids for _ in range(2))
    c = cuda_engine.generate(prompt, SamplingParams(**{**sp.__dict__, "seed": 6}))[0].token_ids
    batch = [r.token_ids for r in cuda_engine.generate([prompt, random_ids(30, seed=42), prompt], sp)]
    assert a == b == batch[0] == batch[2] and a != c


def test_structured_output_on_the_gpu(tmp_path_factory):
    """The grammar mask applied to CUDA logits (xgrammar's GPU kernel), in graph decode steps:
    a random-weight model with a byte-level tokenizer writes what the regex / choices allow."""
    import re
    d = write_random_llama(tmp_path_factory.mktemp("byte-level"), DUMMY_SHAPES["smollm2-135m-dummy"],
                           byte_level=True)
    e = Engine(model=str(d), device="cuda", dtype="bfloat16", kv_cache_bytes=1 << 29, max_num_seqs=8)
    prompt = e.encode("Call me at")
    free = e.generate(prompt, SamplingParams(max_tokens=12))[0].text
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    assert not re.fullmatch(pattern, free)
    for temperature in (0.0, 1.0):
        outs = e.generate([prompt] * 3, SamplingParams(max_tokens=30, temperature=temperature, seed=4,
                                                       structured=("regex", pattern)))
        for r in outs:
            assert r.finish_reason == "stop" and re.fullmatch(pattern, r.text), r.text
    r = e.generate(prompt, SamplingParams(max_tokens=10, structured=("choice", ["alpha", "beta"])))[0]
    assert r.text in ("alpha", "beta") and r.finish_reason == "stop"
    assert e.blocks.num_free == e.blocks.num_blocks


def test_graph_decode_equals_eager_decode():
    """Same model, same bf16 kernels; graphs on or off must not change one token. Batch sizes are
    bucket sizes, so both paths run matmuls of the same shapes."""
    tokens = {}
    prompts = [random_ids(n, seed=n, vocab=128000) for n in (5, 40, 300, 600)]
    for graphs in (True, False):
        e = Engine(model="llama-3.2-1b-dummy", device="cuda", dtype="bfloat16", kv_cache_bytes=1 << 30,
                   max_num_seqs=8, cuda_graphs=graphs)
        e.runner.prefill_graphs = None  # prefills eager in both: only decode differs
        params = SamplingParams(max_tokens=40, ignore_eos=True)
        tokens[graphs] = [r.token_ids for r in e.generate(prompts, params)]      # decode batch 4
        tokens[graphs].append(e.generate(prompts[2], params)[0].token_ids)      # decode batch 1
        assert (e.runner.graphs is not None) == graphs
        if graphs:
            assert sorted(e.runner.graphs.graphs) == [1, 2, 4, 8]
        assert e.blocks.num_free == e.blocks.num_blocks
        del e
        torch.cuda.empty_cache()
    assert tokens[True] == tokens[False]
    assert len({tuple(t) for t in tokens[True]}) > 1


def test_graph_prefill_equals_eager_prefill():
    """The prefill graphs replayed, and the same static-buffer steps run eagerly: same kernels,
    so the same bits, bf16 included: prompts from scratch (several in one step) and suffixes
    after cached prefixes, up to the largest bucket."""
    from lmdisagg.engine.cuda_graphs import PrefillGraphs
    tokens = {}
    prefix = random_ids(700, seed=3, vocab=128000)
    for capture in (True, False):
        e = Engine(model="llama-3.2-1b-dummy", device="cuda", dtype="bfloat16", kv_cache_bytes=1 << 30,
                   max_num_seqs=8, cuda_graphs=True)
        if not capture:
            e.runner.prefill_graphs = PrefillGraphs(e.model, e.runner.kv, 8, e.max_model_len,
                                                    e.config.chunk_tokens, capture=False)
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        prompts = [random_ids(n, seed=n, vocab=128000) for n in (5, 40, 300)]   # one 345-token step
        out = [r.token_ids for r in e.generate(prompts, params)]
        e.generate(prefix, SamplingParams(max_tokens=1))                        # 700 tokens: eager
        for n in (1, 60, 255, 500):                                              # suffixes after 512 cached
            r = e.generate(prefix[:512] + random_ids(n, seed=100 + n, vocab=128000), params)[0]
            assert r.cached_tokens == 512
            out.append(r.token_ids)
        tokens[capture] = out
        assert e.runner.prefill_graphs.steps == 5
        assert e.blocks.num_free == e.blocks.num_blocks
        del e
        torch.cuda.empty_cache()
    assert tokens[True] == tokens[False]


def test_graphs_captured_while_the_collector_frees_old_engines(monkeypatch):
    """An engine built in a process that dropped others (a test suite, a worker that rebuilds):
    those engines sit in reference cycles, so the garbage collector frees them, and it may run
    in the middle of the new engine's graph capture, on the capturing thread. That must not break
    the capture (it did, in the serving tests on 2xH200). Here an old engine becomes cyclic
    garbage right as the first capture begins, with the collector due at every allocation."""
    import gc
    kw = dict(model="smollm2-135m-dummy", device="cuda", dtype="float32", kv_cache_bytes=1 << 28, max_model_len=1024)
    old = Engine(**kw)
    cycle = [old]
    cycle.append(cycle)
    keep = [cycle]
    del old, cycle
    begin = torch.cuda.CUDAGraph.capture_begin

    def capture_begin(self, *args, **kwargs):
        begin(self, *args, **kwargs)
        keep.clear()  # the old engine is garbage now, for the collector alone to free

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", capture_begin)
    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        e = Engine(**kw)
    finally:
        gc.set_threshold(*thresholds)
        monkeypatch.undo()
    assert not keep  # the capture did begin
    gc.collect()
    eager = Engine(**kw, cuda_graphs=False)
    ids = random_ids(40, seed=3)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    assert e.generate(ids, params)[0].token_ids == eager.generate(ids, params)[0].token_ids
    assert e.runner.graphs.steps > 0
