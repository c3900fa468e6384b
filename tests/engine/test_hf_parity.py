"""Greedy output of our engine == HF transformers greedy output, token for token (CPU fp32)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmdisagg.engine import SamplingParams
from tests.conftest import hf_greedy

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
]
N = 40


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_python_api_matches_hf(engine, hf_model, chat):
    params = SamplingParams(max_tokens=N, ignore_eos=True)
    results = engine.generate(PROMPTS, params, chat=chat)
    for prompt, r in zip(PROMPTS, results):
        ids = engine.encode_chat([{"role": "user", "content": prompt}]) if chat else engine.encode(prompt)
        assert r.prompt_tokens == len(ids)
        assert len(r.token_ids) == N
        assert r.token_ids == hf_greedy(hf_model, ids, N), prompt


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_cli_matches_hf(engine, hf_model, chat):
    prompt = PROMPTS[2]
    cmd = [sys.executable, "-m", "lmdisagg.cli", "generate", "--model", "smollm2-135m", "--prompt", prompt,
           "--max-tokens", str(N), "--json"] + (["--chat"] if chat else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ids = engine.encode_chat([{"role": "user", "content": prompt}]) if chat else engine.encode(prompt)
    # the CLI stops at EOS, as a user expects; HF without EOS runs on, so compare the common part
    expected = hf_greedy(hf_model, ids, N)
    got = result["token_ids"]
    assert got == expected[:len(got)]
    assert len(got) == N or got[-1] in engine.eos_token_ids
    assert result["prompt_tokens"] == len(ids) and result["cached_tokens"] == 0
    assert result["text"] == engine.decode([t for t in got if t not in engine.eos_token_ids])


def test_chat_stops_at_eos(engine):
    r = engine.generate("What is 2+2?", SamplingParams(max_tokens=200), chat=True)[0]
    assert r.finish_reason == "stop"
    assert r.token_ids[-1] in engine.eos_token_ids
    assert "4" in r.text and "<|im_end|>" not in r.text


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_logprobs_match_hf(engine, hf_model, temperature):
    """Each generated token's log-probability and its top alternatives equal HF's log_softmax of
    the model's logits at that position (raw logits: temperature does not change them)."""
    import torch
    prompt, n, k = PROMPTS[3], 12, 5
    params = SamplingParams(max_tokens=n, ignore_eos=True, temperature=temperature, seed=3, logprobs=k)
    r = engine.generate(prompt, params)[0]
    assert r.logprobs is not None and len(r.logprobs) == len(r.token_ids) == n
    ids = engine.encode(prompt) + r.token_ids
    with torch.no_grad():
        lsm = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [len, vocab]
    p0 = len(ids) - n - 1  # the logits row that predicts the first generated token
    for j, (tok, (lp, top)) in enumerate(zip(r.token_ids, r.logprobs)):
        row = lsm[p0 + j]
        assert lp == pytest.approx(row[tok].item(), abs=1e-4)
        want_lp, want_id = row.topk(k)
        assert [t for t, _ in top] == want_id.tolist()
        assert [v for _, v in top] == pytest.approx(want_lp.tolist(), abs=1e-4)
        if temperature == 0.0:
            assert top[0][0] == tok and top[0][1] == pytest.approx(lp, abs=1e-6)
    # asked for none: none computed
    assert engine.generate(prompt, SamplingParams(max_tokens=2))[0].logprobs is None
    # the names logprobs give tokens (cached per id): each token decoded alone, special ones too
    named = ids + sorted(engine.eos_token_ids) + ids
    assert engine.tokenizer.token_texts(named) == [engine.tokenizer.hf.decode([i]) for i in named]
    # 0 alternatives: each token's own value only
    r0 = engine.generate(prompt, SamplingParams(max_tokens=3, logprobs=0))[0]
    assert [len(top) for _, top in r0.logprobs] == [0, 0, 0]
    assert r0.logprobs[0][0] == pytest.approx(lsm[p0][r0.token_ids[0]].item(), abs=1e-4)  # row p0: the prompt's


def test_repetition_penalty_matches_hf(engine, hf_model):
    import torch
    prompt, n = "List the days of the week: Monday, Tuesday,", 30
    ids = engine.encode(prompt)
    r = engine.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True, repetition_penalty=1.3))[0]
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, repetition_penalty=1.3,
                                 eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert r.token_ids == want
    assert r.token_ids != engine.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids


def test_penalties_and_logit_bias_match_reference(engine, hf_model):
    """OpenAI's frequency / presence penalties (output tokens) and logit_bias, greedy: the same
    tokens as applying them by hand to HF's logits at each step."""
    import torch
    prompt, n = "Repeat after me: the cat sat on the mat, the cat sat on the mat,", 24
    ids = engine.encode(prompt)
    plain = engine.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids
    bias = ((plain[0], -100.0), (plain[1], 3.0))
    params = SamplingParams(max_tokens=n, ignore_eos=True, frequency_penalty=0.8, presence_penalty=0.5,
                            logit_bias=dict(bias))  # a dict, as the API sends it, or pairs
    got = engine.generate(prompt, params)[0].token_ids
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            row = hf_model(torch.tensor([ids + out])).logits[0, -1].float().clone()
            for t, b in bias:
                row[t] += b
            for t in set(out):
                row[t] -= 0.8 * out.count(t) + 0.5
            out.append(int(row.argmax()))
    assert got == out
    assert got[0] != plain[0] and got != plain


def test_allowed_token_ids_match_reference(engine, hf_model):
    """vLLM's allowed_token_ids, greedy: the same tokens as the argmax over only those ids of HF's
    logits at each step."""
    import torch
    prompt, n = "My favourite numbers are", 12
    ids = engine.encode(prompt)
    allowed = sorted({int(t) for t in engine.encode(" 1 2 3 7 seven, and")})
    got = engine.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True, allowed_token_ids=allowed))[0].token_ids
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            row = hf_model(torch.tensor([ids + out])).logits[0, -1].float()
            out.append(allowed[int(row[allowed].argmax())])
    assert got == out and set(got) <= set(allowed)


def test_top_k_and_min_p_narrow_sampling(engine):
    prompt = "Once upon a time"
    greedy = engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # each leaves only the most likely token
        r = engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.5, seed=1, **extra))
        assert r[0].token_ids == greedy, extra
    loose = engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.5, seed=1))[0]
    assert loose.token_ids != greedy  # the same seed without them does sample


@pytest.mark.parametrize("field,value", [("frequency_penalty", 2.5), ("presence_penalty", -3.0),
                                         ("repetition_penalty", 0.0), ("min_p", 1.5), ("top_k", -2),
                                         ("logit_bias", ((5, 101.0),)), ("logit_bias", ((10 ** 6, 1.0),)),
                                         ("logit_bias", [5]), ("logit_bias", 5), ("logit_bias", {5: "x"}),
                                         ("min_tokens", -1), ("allowed_token_ids", (-1,)),
                                         ("allowed_token_ids", (10 ** 6,)), ("allowed_token_ids", 5),
                                         ("cache_salt", ""), ("cache_salt", 5),
                                         ("logprobs", 21)])
def test_bad_sampling_values_are_refused(engine, field, value):
    from lmdisagg.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("bad", engine.encode("hi"), SamplingParams(**{field: value}))
    assert e.value.param == field
    assert not engine.has_unfinished()


def test_prompt_logprobs_match_hf_even_when_the_prompt_is_cached(engine, hf_model):
    """Prompt logprobs (each prompt token's, given the tokens before it) equal HF's, also for a
    prompt whose chunks are in the prefix cache (it is then computed whole), and come once."""
    import torch
    t = engine.config.chunk_tokens
    ids = engine.encode(" ".join(["the quick brown fox jumps over the lazy dog"] * 40))[:t + 37]
    engine.generate(ids, SamplingParams(max_tokens=1))  # its first chunk is cached now
    k = 2
    r = engine.generate(ids, SamplingParams(max_tokens=3, prompt_logprobs=k, logprobs=k))[0]
    assert r.cached_tokens == 0  # not served from the cache
    lp = r.prompt_logprobs
    assert len(lp) == len(ids) and lp[0] is None
    with torch.no_grad():
        lsm = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for j in range(1, len(ids)):
        v, top = lp[j]
        assert v == pytest.approx(lsm[j - 1, ids[j]].item(), abs=1e-4), j
        assert [a for a, _ in top] == lsm[j - 1].topk(k).indices.tolist()
    assert r.logprobs[0][0] == pytest.approx(lsm[-1, r.token_ids[0]].item(), abs=1e-4)
    again = engine.generate(ids, SamplingParams(max_tokens=2))[0]
    assert again.prompt_logprobs is None and again.cached_tokens == t


def test_min_tokens_matches_hf_min_new_tokens(engine, hf_model):
    """min_tokens holds EOS back as HF's min_new_tokens does: greedy tokens equal HF's, up to and
    including the EOS that ends them."""
    import torch
    question = "What is 2+2?"
    ids = engine.encode_chat([{"role": "user", "content": question}])
    base = engine.generate(question, SamplingParams(max_tokens=200), chat=True)[0]
    assert base.finish_reason == "stop"
    k = len(base.token_ids) + 8  # past where it stopped on its own
    r = engine.generate(question, SamplingParams(max_tokens=200, min_tokens=k), chat=True)[0]
    assert len(r.token_ids) > k and not set(r.token_ids[:k]) & set(engine.eos_token_ids)
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([ids]), max_new_tokens=len(r.token_ids), min_new_tokens=k,
                                 do_sample=False, eos_token_id=sorted(engine.eos_token_ids),
                                 pad_token_id=0)[0, len(ids):].tolist()
    assert r.token_ids == want[:len(r.token_ids)]
    if r.finish_reason == "stop":
        assert r.token_ids[-1] in engine.eos_token_ids


def test_min_tokens_holds_stop_strings_back(engine):
    """A stop string completed within the first min_tokens tokens does not stop the request (as
    vLLM); the first one completed after them does."""
    prompt, stop = "Count: 1, 2, 3, 4,", ","
    base = engine.generate(prompt, SamplingParams(max_tokens=30, ignore_eos=True))[0]
    m = 7
    r = engine.generate(prompt, SamplingParams(max_tokens=30, ignore_eos=True, stop=(stop,), min_tokens=m))[0]
    held = len(engine.decode(base.token_ids[:m]))  # the text when min_tokens were out
    cut = base.text.find(stop, held - len(stop) + 1)
    assert 0 <= cut and r.text == base.text[:cut] and r.finish_reason == "stop"
    assert engine.generate(prompt, SamplingParams(max_tokens=30, stop=(stop,)))[0].text == base.text[:base.text.find(stop)]
    assert len(r.text) > base.text.find(stop)  # it went past the first comma


def test_the_tokenizer_is_autotokenizers_loaded_without_its_config_lookup(engine):
    """The engine loads the model's tokenizer without AutoTokenizer's AutoConfig lookup (which
    imports the model's config module and, through it, torch.distributed.tensor and sympy: about
    a second at every worker start), and gets what AutoTokenizer gives: class, vocabulary,
    special tokens, chat template, encodings, decodings, rendered chats."""
    from transformers import AutoTokenizer
    path = engine.source.path
    ours, auto = engine.tokenizer.hf, AutoTokenizer.from_pretrained(str(path))
    assert type(ours) is type(auto)
    assert len(ours) == len(auto) and ours.get_vocab() == auto.get_vocab()
    assert ours.all_special_tokens == auto.all_special_tokens
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (auto.bos_token_id, auto.eos_token_id,
                                                                        auto.pad_token_id)
    assert ours.chat_template == auto.chat_template
    texts = PROMPTS + ["<|im_start|>user\nhi<|im_end|>", "  leading spaces\tand tabs\n\n", "naïve café 🙂 日本語",
                       "<|endoftext|>x<|im_end|>", ""]
    for t in texts:
        ids = ours(t)["input_ids"]
        assert ids == auto(t)["input_ids"], t
        assert ours.decode(ids) == auto.decode(ids) and ours.decode(ids, skip_special_tokens=True) == \
            auto.decode(ids, skip_special_tokens=True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And now?"}]
    for gen in (True, False):
        assert ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) == \
            auto.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
    code = ("import sys; from pathlib import Path; from lmdisagg.engine.loader import _hf_tokenizer\n"
            "_hf_tokenizer(Path(sys.argv[1]))\n"
            "print([m for m in ('transformers.models.llama.configuration_llama', 'torch.distributed.tensor', "
            "'sympy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
