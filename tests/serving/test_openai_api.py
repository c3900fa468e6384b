"""The official openai client against `lmdisagg serve` on cluster_configs/local-cpu.yaml
(1 prefill + 1 decode actor, KV over shared memory)."""
from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys
import time

import httpx
import jsonschema
import openai
import pytest

from lmdisagg.engine import SamplingParams
from tests.serving.conftest import ROOT

MODEL = "smollm2-135m"
GREEDY = {"temperature": 0, "extra_body": {"return_token_ids": True}}


def ref(engine, prompt, max_tokens, chat=False, **kw):
    return engine.generate(prompt, SamplingParams(max_tokens=max_tokens, **kw), chat=chat)[0]


def test_completion_equals_lmdisagg_generate(served):
    prompt = "The three laws of robotics are"
    out = subprocess.run([sys.executable, "-m", "lmdisagg.cli", "generate", "--prompt", prompt, "--max-tokens", "32",
                          "--json"], capture_output=True, text=True, timeout=300)
    expected = json.loads(out.stdout.strip().splitlines()[-1])
    r = served.client().completions.create(model=MODEL, prompt=prompt, max_tokens=32, **GREEDY)
    assert r.choices[0].model_extra["token_ids"] == expected["token_ids"]
    assert r.choices[0].text == expected["text"]
    assert r.usage.prompt_tokens == expected["prompt_tokens"]
    assert r.usage.completion_tokens == len(expected["token_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streamed_equals_unstreamed_equals_engine(served, engine, chat):
    c = served.client()
    prompt = "Explain why the sky is blue in two sentences."
    kw = dict(model=MODEL, max_tokens=40, **GREEDY)
    expected = ref(engine, prompt, 40, chat=chat)
    if chat:
        msgs = [{"role": "user", "content": prompt}]
        full = c.chat.completions.create(messages=msgs, **kw)
        text = full.choices[0].message.content
        chunks = list(c.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True}, **kw))
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    else:
        full = c.completions.create(prompt=prompt, **kw)
        text = full.choices[0].text
        chunks = list(c.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True}, **kw))
        streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert full.choices[0].model_extra["token_ids"] == expected.token_ids
    assert text == expected.text and streamed == text
    assert full.choices[0].finish_reason == expected.finish_reason
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == expected.finish_reason
    usage = chunks[-1].usage                          # the final usage chunk, no choices
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == expected.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens == len(expected.token_ids) == full.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    # vLLM's continuous_usage_stats: every chunk carries the usage so far, counting up to the final one
    opts = {"include_usage": True, "continuous_usage_stats": True}
    if chat:
        chunks = list(c.chat.completions.create(messages=msgs, stream=True, stream_options=opts, **kw))
    else:
        chunks = list(c.completions.create(prompt=prompt, stream=True, stream_options=opts, **kw))
    counts = [ch.usage.completion_tokens for ch in chunks]
    assert all(ch.usage.prompt_tokens == expected.prompt_tokens for ch in chunks)
    assert counts == sorted(counts) and counts[-1] == len(expected.token_ids)
    assert counts[0] < counts[-1] or len(expected.token_ids) == 1


def test_first_chunk_comes_with_the_first_token(served):
    # benchmark clients (vllm bench serve, ...) time the first token by the first chunk with
    # choices: a role chunk sent before the prefill has run would make TTFT read ~0
    c = served.client()
    nonce = time.time_ns()
    words = " ".join(f"item{(nonce + k) % 9973}" for k in range(150))  # a prompt no cache holds
    t0 = time.perf_counter()
    first = content = None
    roles = []
    for ch in c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": words}], max_tokens=4,
                                        n=2, temperature=0, stream=True):
        now = time.perf_counter() - t0
        for choice in ch.choices:
            first = now if first is None else first
            if choice.delta.role:
                roles.append(choice.index)
            elif choice.delta.content and content is None:
                content = now
                assert choice.index in roles  # each choice's role chunk comes before its text
    assert sorted(roles) == [0, 1]
    assert content is not None and content > 0.2  # a prefill of ~600 tokens on the CPU
    assert first >= 0.8 * content, (first, content)


def test_sampling_options(served, engine):
    c = served.client()
    prompt = "Count: 1, 2, 3, 4,"
    base = ref(engine, prompt, 20, ignore_eos=True)
    stop_at = base.text.index(" 7")
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, stop=[" 7"], **GREEDY)
    assert r.choices[0].text == base.text[:stop_at] and r.choices[0].finish_reason == "stop"
    # max_completion_tokens (chat) and ignore_eos
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                  max_completion_tokens=50, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 50 and r.choices[0].finish_reason == "length"
    # seed: same seed -> same sample, through the disaggregated path (sampler state handed over)
    kw = dict(model=MODEL, prompt="Write a haiku about rain.", max_tokens=24, temperature=0.9, top_p=0.95)
    a = c.completions.create(seed=42, **kw).choices[0].text
    b = c.completions.create(seed=42, **kw).choices[0].text
    d = c.completions.create(seed=43, **kw).choices[0].text
    assert a == b and a != d
    assert a == ref(engine, kw["prompt"], 24, temperature=0.9, top_p=0.95, seed=42).text
    # n: greedy choices are identical, seeded samples differ; usage counts the prompt once
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=8, n=3, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1, 2] and len({ch.text for ch in r.choices}) == 1
    assert r.usage.prompt_tokens == len(engine.encode("Hello")) and r.usage.completion_tokens == 24
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=8, n=3, temperature=1.0, seed=5)
    assert len({ch.text for ch in r.choices}) > 1



def test_penalties_bias_top_k_min_p_equal_engine(served, engine):
    """OpenAI's frequency / presence penalties and logit_bias, and vLLM's repetition_penalty,
    top_k and min_p, served disaggregated (the first token sampled by the prefill worker, the
    rest by the decode worker, which must count the tokens before them) equal one engine's."""
    c = served.client()
    prompt = "Count: 1, 2, 3, 4,"
    base = ref(engine, prompt, 20, ignore_eos=True)
    expected = ref(engine, prompt, 20, ignore_eos=True, frequency_penalty=0.6, presence_penalty=0.4,
                   repetition_penalty=1.2, logit_bias=((base.token_ids[0], -100.0),))
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, frequency_penalty=0.6,
                             presence_penalty=0.4, logit_bias={str(base.token_ids[0]): -100},
                             extra_body={"repetition_penalty": 1.2, "ignore_eos": True, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == expected.token_ids != base.token_ids
    assert r.choices[0].text == expected.text
    kw = dict(temperature=1.2, top_p=0.9, seed=7)
    want = ref(engine, "Write a haiku about rain.", 24, top_k=20, min_p=0.05, **kw).text
    got = c.completions.create(model=MODEL, prompt="Write a haiku about rain.", max_tokens=24,
                               extra_body={"top_k": 20, "min_p": 0.05}, **kw).choices[0].text
    assert got == want
    # min_tokens (vLLM; genai-perf sends it for fixed-length outputs): EOS waits, the first token
    # sampled on the prefill worker and the rest on the decode worker count towards it
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    short = ref(engine, "What is 2+2?", 100, chat=True)
    want = ref(engine, "What is 2+2?", 100, chat=True, min_tokens=len(short.token_ids) + 5)
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=100, temperature=0,
                                  extra_body={"min_tokens": len(short.token_ids) + 5, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == want.token_ids
    assert r.usage.completion_tokens > len(short.token_ids) + 5
    # what clients send by default is accepted: neutral values of fields this server cannot honour
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                  response_format={"type": "text"}, frequency_penalty=0, presence_penalty=0,
                                  extra_body={"min_tokens": 0, "top_k": -1})
    assert r.usage.completion_tokens >= 1


def test_vllm_prompt_and_sampling_fields_equal_engine(served, engine):
    """vLLM's continue_final_message / add_generation_prompt (the prompt rendered here with HF
    transformers), truncate_prompt_tokens, allowed_token_ids, skip_special_tokens and
    return_tokens_as_token_ids, served disaggregated: the same tokens as one engine."""
    c = served.client()
    hf = engine.tokenizer.hf

    def rendered(messages, **kw):
        return hf(hf.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)["input_ids"]

    msgs = [{"role": "user", "content": "Write one sentence about cats."}, {"role": "assistant", "content": "Cats are"}]
    for kw in ({"continue_final_message": True, "add_generation_prompt": False}, {"add_generation_prompt": False}):
        ids = rendered(msgs, **kw)
        want = engine.generate([ids], SamplingParams(max_tokens=16))[0]
        r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                      extra_body={**kw, "return_token_ids": True})
        assert r.usage.prompt_tokens == len(ids) and r.choices[0].model_extra["token_ids"] == want.token_ids
    # the continued message is left open: the answer goes on from "Cats are"
    assert hf.decode(rendered(msgs, continue_final_message=True)).endswith("Cats are")
    # truncate_prompt_tokens: the prompt's last k tokens
    prompt = "The history of the printing press begins in the fifteenth century, when"
    ids = engine.encode(prompt)[-6:]
    want = engine.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    for chat in (False, True):
        if chat:
            ids = rendered([{"role": "user", "content": prompt}], add_generation_prompt=True)[-6:]
            want = engine.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True))[0]
            r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=12,
                                          temperature=0, extra_body={"truncate_prompt_tokens": 6, "ignore_eos": True,
                                                                     "return_token_ids": True})
        else:
            r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"truncate_prompt_tokens": 6, "ignore_eos": True, "return_token_ids": True})
        assert r.usage.prompt_tokens == 6 and r.choices[0].model_extra["token_ids"] == want.token_ids
    # allowed_token_ids: only those come, greedy and seeded, as one engine picks them
    base = ref(engine, "Count: 1, 2, 3, 4,", 20, ignore_eos=True)
    allowed = sorted(set(base.token_ids[1:8]) | set(engine.encode(" 9 10 11")))
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        want = ref(engine, "Count: 1, 2, 3, 4,", 20, ignore_eos=True, allowed_token_ids=tuple(allowed), **kw)
        r = c.completions.create(model=MODEL, prompt="Count: 1, 2, 3, 4,", max_tokens=20, **kw,
                                 extra_body={"allowed_token_ids": allowed, "ignore_eos": True, "return_token_ids": True})
        got = r.choices[0].model_extra["token_ids"]
        assert got == want.token_ids and set(got) <= set(allowed) and got != base.token_ids
    # skip_special_tokens: false keeps special tokens' text (past EOS here, with ignore_eos)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True, "skip_special_tokens": False, "return_token_ids": True})
    ids = r.choices[0].model_extra["token_ids"]
    assert ids == ref(engine, "What is 2+2?", 40, chat=True, ignore_eos=True).token_ids
    assert r.choices[0].message.content == hf.decode(ids, skip_special_tokens=False)
    assert "<|im_end|>" in r.choices[0].message.content  # the premise: the model closed its turn
    chunks = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert "".join(x.choices[0].delta.content or "" for x in chunks if x.choices) == r.choices[0].message.content
    # return_tokens_as_token_ids: logprobs name tokens by id
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2,
                             extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
    lp, ids = r.choices[0].logprobs, r.choices[0].model_extra["token_ids"]
    assert lp.tokens == [f"token_id:{t}" for t in ids]
    assert all(k.startswith("token_id:") for top in lp.top_logprobs for k in top)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
                                  logprobs=True, top_logprobs=1, extra_body={"return_tokens_as_token_ids": True,
                                                                            "return_token_ids": True})
    assert [x.token for x in r.choices[0].logprobs.content] == \
        [f"token_id:{t}" for t in r.choices[0].model_extra["token_ids"]]


def test_structured_outputs_equal_engine(served, engine):
    """response_format (json_schema, json_object), the openai client's ``parse`` helper with a
    pydantic model, and vLLM's guided_regex / structured_outputs, served disaggregated: the
    prefill worker samples the first token under the grammar, the decode worker replays it into
    its own matcher and goes on. The tokens equal one engine's; the output fits (jsonschema, re)."""
    import re
    from typing import Literal

    import pydantic

    from tests.engine.test_structured import ASK, PERSON
    c = served.client()
    ask = ASK[0]["content"]
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    want = ref(engine, ask, 80, chat=True, structured=("json", PERSON))
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=80, response_format=rf, **GREEDY)
    assert r.choices[0].model_extra["token_ids"] == want.token_ids
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    want = ref(engine, ask, 80, chat=True, structured=("json", PERSON), temperature=1.2, seed=3)
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=80, response_format=rf, temperature=1.2,
                                  seed=3)
    assert r.choices[0].message.content == want.text
    jsonschema.validate(json.loads(want.text), PERSON)

    class Person(pydantic.BaseModel):
        name: str
        age: int
        city: Literal["Paris", "Rome", "Oslo"]
    parsed = c.chat.completions.parse(model=MODEL, messages=ASK, max_tokens=80, temperature=0,
                                      response_format=Person).choices[0].message.parsed
    assert isinstance(parsed, Person)
    # json_object, streamed
    want = ref(engine, ask, 80, chat=True, structured=("json", ""))
    chunks = list(c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=80, temperature=0, stream=True,
                                            response_format={"type": "json_object"}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want.text and isinstance(json.loads(text), dict)
    # vLLM's fields: guided_regex on completions, structured_outputs' choice on chat
    pattern = r" \(\d{3}\) \d{3}-\d{4}"
    want = ref(engine, "My phone number is", 30, structured=("regex", pattern))
    r = c.completions.create(model=MODEL, prompt="My phone number is", max_tokens=30, temperature=0,
                             extra_body={"guided_regex": pattern})
    assert r.choices[0].text == want.text and re.fullmatch(pattern, want.text)
    options = ["positive", "negative", "neutral"]
    msgs = [{"role": "user", "content": "Is 'I loved this film' positive or negative?"}]
    want = ref(engine, msgs[0]["content"], 10, chat=True, structured=("choice", options))
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                  extra_body={"structured_outputs": {"choice": options}})
    assert r.choices[0].message.content == want.text and want.text in options


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"],
                   "additionalProperties": False}}}


def test_tool_calls_equal_engine(served, engine):
    """Forced tool calls (a named function, or tool_choice "required"), streamed or not, through
    the official client: the calls' arguments fit their tools' schemas (jsonschema) and are the
    text one engine makes under the same constraint; a conversation carrying the calls and their
    results goes on; "auto" (which needs a model-specific parser) is refused with 400."""

    from lmdisagg.router.protocol import Tool, ToolPlan
    c = served.client()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    msgs = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    kw = dict(model=MODEL, messages=msgs, tools=[WEATHER, CLOCK], temperature=0, max_tokens=60)
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(tool_choice=named, **kw)
    choice = r.choices[0]
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert choice.message.content is None and choice.finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), schemas["get_weather"])
    want = ref(engine, msgs[0]["content"], 60, chat=True, structured=("json", schemas["get_weather"]))
    assert call.function.arguments == want.text
    # streamed: the id and name come first, the arguments in pieces that add up to the same text
    chunks = list(c.chat.completions.create(tool_choice=named, stream=True, **kw))
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and len(deltas) > 2
    assert "".join(d.function.arguments or "" for d in deltas) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]
    # required: one or more calls of any of the tools, as a JSON array under the tools' schemas
    plan = ToolPlan("required", [Tool.model_validate(t) for t in (WEATHER, CLOCK)], None, True)
    want = ref(engine, msgs[0]["content"], 60, chat=True, structured=plan.structured)
    expected = [(it["name"], it["parameters"]) for it in json.loads(want.text)]
    r = c.chat.completions.create(tool_choice="required", **kw)
    calls = r.choices[0].message.tool_calls
    assert [(x.function.name, json.loads(x.function.arguments)) for x in calls] == expected
    assert r.choices[0].finish_reason == "tool_calls" and len({x.id for x in calls}) == len(calls)
    for x in calls:
        jsonschema.validate(json.loads(x.function.arguments), schemas[x.function.name])
    chunks = list(c.chat.completions.create(tool_choice="required", stream=True, **kw))
    streamed = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert [(x.function.name, json.loads(x.function.arguments)) for x in streamed] == expected
    assert [x.index for x in streamed] == list(range(len(expected)))
    r = c.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **kw)
    assert len(r.choices[0].message.tool_calls) == 1
    # the conversation goes on with the call and its result (SmolLM2's template does not render
    # tool_calls: they are written into the assistant turn's content)
    turn = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                   {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    r = c.chat.completions.create(model=MODEL, messages=turn, tools=[WEATHER], tool_choice="none", temperature=0,
                                  max_tokens=30, extra_body={"return_token_ids": True})
    ids = engine.tokenizer.apply_chat_template(turn)
    shown = engine.decode(ids)
    assert '"name": "get_weather", "arguments": {"city": "Paris"' in shown and '"sky": "clear"' in shown
    assert r.choices[0].model_extra["token_ids"] == engine.generate(ids, SamplingParams(max_tokens=30))[0].token_ids
    for bad in ({}, {"tool_choice": "auto"}, {"tool_choice": {"type": "function", "function": {"name": "nope"}}}):
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            c.chat.completions.create(**{**kw, **bad})
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        c.chat.completions.create(model=MODEL, messages=msgs, tool_choice="required", max_tokens=5)


# tool_choice "auto": a deployment with cluster_configs/templates/smollm2-tools.jinja as its chat template
# (SmolLM2's own plus tools in the hermes format; the router takes the hermes parser from it)
TOOLS_TEMPLATE = ROOT / "cluster_configs" / "templates" / "smollm2-tools.jinja"


def call_of(city: str, unit: str = "celsius", cid: str = "call_1") -> dict:
    return {"id": cid, "type": "function", "function": {"name": "get_weather",
                                                         "arguments": json.dumps({"city": city, "unit": unit})}}


def hermes_calls(text: str) -> list[tuple[str, dict]]:
    """The test's own reading of hermes blocks (not the server's parser)."""
    return [(c["name"], c["arguments"]) for c in map(json.loads, re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S))]


def test_auto_tool_choice_reads_the_models_calls(local_ray, engine):
    """tool_choice "auto" through the official client, served disaggregated with a chat template
    that shows the tools (router.chat_template): a call the model writes comes back as
    message.tool_calls (streamed too), an answer in words as content, text that only starts like
    a call as content, whole; the next turn's calls and results are rendered by the template, and
    chat_template_kwargs reach it. Prompts are rendered here with HF transformers from the template
    file, and every token is as one engine makes it from them."""
    from lmdisagg import Pipeline, Role
    template = TOOLS_TEMPLATE.read_text()
    hf = engine.tokenizer.hf

    def expect(messages, max_tokens, **kw):
        text = hf.apply_chat_template(messages, tools=[WEATHER], chat_template=template,
                                      add_generation_prompt=True, tokenize=False, **kw)
        return engine.generate([hf(text, add_special_tokens=False)["input_ids"]], SamplingParams(max_tokens=max_tokens))[0]

    pipe = Pipeline(model=MODEL, prefill=Role(), decode=Role(), kv_cache_bytes=1 << 29,
                    chat_template=str(TOOLS_TEMPLATE)).start()
    try:
        assert pipe.router.tool_parser.name == "hermes"  # named by the template's own call format
        c = openai.OpenAI(base_url=pipe.url, api_key="x", max_retries=0, timeout=300)
        kw = dict(model=MODEL, tools=[WEATHER], temperature=0, max_tokens=60, extra_body={"return_token_ids": True})
        shot = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call_of("Paris")]}]
        ask = shot + [{"role": "user", "content": "What is the weather in Rome?"}]
        want = expect(ask, 60)
        expected = hermes_calls(want.text)
        assert [(n, a["city"]) for n, a in expected] == [("get_weather", "Rome")]  # the premise
        for choice in (None, "auto"):
            r = c.chat.completions.create(messages=ask, **({"tool_choice": choice} if choice else {}), **kw)
            ch = r.choices[0]
            assert ch.model_extra["token_ids"] == want.token_ids and r.usage.prompt_tokens == want.prompt_tokens
            assert ch.finish_reason == "tool_calls" and ch.message.content is None
            assert [(t.function.name, json.loads(t.function.arguments)) for t in ch.message.tool_calls] == expected
            assert ch.message.tool_calls[0].id.startswith("call_") and ch.message.tool_calls[0].type == "function"
        chunks = list(c.chat.completions.create(messages=ask, stream=True, stream_options={"include_usage": True}, **kw))
        deltas = [tc for x in chunks if x.choices for tc in x.choices[0].delta.tool_calls or []]
        assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [(0, *expected[0])]
        assert not "".join(x.choices[0].delta.content or "" for x in chunks if x.choices)
        assert [x.choices[0].finish_reason for x in chunks if x.choices and x.choices[0].finish_reason] == ["tool_calls"]
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)
        # n = 2, greedy: each choice is read on its own, both the same call
        r = c.chat.completions.create(messages=ask, n=2, **kw)
        assert [[(t.function.name, json.loads(t.function.arguments)) for t in ch.message.tool_calls]
                for ch in r.choices] == [expected, expected]
        # the Responses API: the earlier call as a function_call input item, the new one as a
        # function_call output item (streamed: the message never opens)
        items = [shot[0], {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                           "arguments": call_of("Paris")["function"]["arguments"]}, ask[-1]]
        rkw = dict(model=MODEL, input=items, tools=[{"type": "function", **WEATHER["function"]}], temperature=0,
                   max_output_tokens=60)
        r = c.responses.create(**rkw)
        assert [(o.type, o.name, json.loads(o.arguments)) for o in r.output] == [("function_call", *expected[0])]
        assert r.usage.input_tokens == want.prompt_tokens and r.usage.output_tokens == len(want.token_ids)
        events = list(c.responses.create(stream=True, **rkw))
        assert "response.content_part.added" not in [e.type for e in events]
        assert [(o.name, json.loads(o.arguments)) for o in events[-1].response.output] == expected
        # the next turn: the call and its result, rendered by the template
        call = c.chat.completions.create(messages=ask, **kw).choices[0].message.tool_calls[0]
        result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}
        turn = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}, result]
        want = expect(turn, 40)
        r = c.chat.completions.create(messages=turn, **{**kw, "max_tokens": 40})
        assert r.usage.prompt_tokens == want.prompt_tokens and r.choices[0].model_extra["token_ids"] == want.token_ids
        # text that starts like a call but is none (here the model writes a made-up result): content, whole
        odd = shot + [{"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "sky": "sunny"}'},
                      {"role": "assistant", "content": "It is 18 degrees and sunny in Paris."},
                      {"role": "user", "content": "What is the weather in Rome?"}]
        want = expect(odd, 60)
        assert want.text.startswith("<tool_call>") and '"name"' not in want.text  # the premise
        for stream in (False, True):
            if stream:
                chunks = list(c.chat.completions.create(messages=odd, stream=True, **kw))
                assert "".join(x.choices[0].delta.content or "" for x in chunks if x.choices) == want.text
                assert not any(x.choices[0].delta.tool_calls for x in chunks if x.choices)
            else:
                r = c.chat.completions.create(messages=odd, **kw)
                assert r.choices[0].message.content == want.text and r.choices[0].message.tool_calls is None
                assert r.choices[0].finish_reason == want.finish_reason
        # an answer in words, streamed or not
        words = shot + [{"role": "user", "content": "What is 2+2?"}]
        want = expect(words, 60)
        assert "<tool_call>" not in want.text  # the premise
        r = c.chat.completions.create(messages=words, **kw)
        assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "stop"
        chunks = list(c.chat.completions.create(messages=words, stream=True, **kw))
        assert "".join(x.choices[0].delta.content or "" for x in chunks if x.choices) == want.text
        # chat_template_kwargs reach the template
        preamble = "Call a tool when the user asks about the weather. Tools:"
        want = expect(ask, 60, tools_preamble=preamble)
        r = c.chat.completions.create(messages=ask, **{**kw, "extra_body": {"return_token_ids": True,
                                                                             "chat_template_kwargs": {"tools_preamble": preamble}}})
        assert r.usage.prompt_tokens == want.prompt_tokens != expect(ask, 1).prompt_tokens
        assert r.choices[0].model_extra["token_ids"] == want.token_ids
        # "none" answers in text; logprobs with tools are refused
        r = c.chat.completions.create(messages=words, tool_choice="none", **kw)
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == expect(words, 60).text
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            c.chat.completions.create(messages=ask, logprobs=True, **kw)
    finally:
        pipe.shutdown()


def test_responses_api_equals_engine(served, engine):
    """OpenAI's Responses API through the official client (client.responses.create / parse),
    served disaggregated: the text is one engine's for the same chat messages, streamed as the
    typed events in order, with usage, incomplete when max_output_tokens cuts it, structured with
    text.format; what a stateless server cannot do is refused with 400."""
    import pydantic
    from typing import Literal

    from tests.engine.test_structured import ASK, PERSON
    c = served.client()
    want = ref(engine, "What is 2+2?", 40, chat=True)
    r = c.responses.create(model=MODEL, input="What is 2+2?", max_output_tokens=40, temperature=0)
    assert r.output_text == want.text and r.status == "completed" and r.id.startswith("resp_")
    assert r.usage.input_tokens == want.prompt_tokens and r.usage.output_tokens == len(want.token_ids)
    msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name a colour."}]
    want = engine.generate([msgs], SamplingParams(max_tokens=30), chat=True)[0]
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Name a "}, {"type": "input_text",
                                                                                      "text": "colour."}]}]
    r = c.responses.create(model=MODEL, instructions="Answer in French.", input=items, max_output_tokens=30,
                           temperature=0)
    assert r.output_text == want.text
    # streamed: the typed events, in order; the deltas add up to the text
    events = list(c.responses.create(model=MODEL, instructions="Answer in French.", input=items,
                                     max_output_tokens=30, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want.text
    assert events[-1].response.output_text == want.text and [e.sequence_number for e in events] == list(range(len(events)))
    # cut by max_output_tokens
    r = c.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=5, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5
    # structured: text.format through the client's parse helper

    class Person(pydantic.BaseModel):
        name: str
        age: int
        city: Literal["Paris", "Rome", "Oslo"]
    r = c.responses.parse(model=MODEL, input=ASK[0]["content"], text_format=Person, max_output_tokens=80,
                          temperature=0)
    assert isinstance(r.output_parsed, Person)
    r = c.responses.create(model=MODEL, input=ASK[0]["content"], max_output_tokens=80, temperature=0,
                           text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}})
    assert r.output_text == ref(engine, ASK[0]["content"], 80, chat=True, structured=("json", PERSON)).text
    # function tools, forced: the calls the chat endpoint makes for the same conversation (its
    # test holds them to one engine's), as function_call items, streamed or not
    rtool = {"type": "function", **WEATHER["function"]}
    ask = "What is the weather in Rome?"
    kw = dict(model=MODEL, input=ask, tools=[rtool], temperature=0, max_output_tokens=60)
    for choice, chat_choice in (("required", "required"),
                                ({"type": "function", "name": "get_weather"}, {"type": "function",
                                                                              "function": {"name": "get_weather"}})):
        chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ask}], tools=[WEATHER],
                                         tool_choice=chat_choice, temperature=0, max_tokens=60)
        want = [(t.function.name, t.function.arguments) for t in chat.choices[0].message.tool_calls]
        r = c.responses.create(tool_choice=choice, **kw)
        assert [(o.type, o.name, o.arguments) for o in r.output] == [("function_call", *w) for w in want]
        assert r.status == "completed" and r.output[0].call_id.startswith("call_") and r.tool_choice
        jsonschema.validate(json.loads(want[0][1]), WEATHER["function"]["parameters"])
        events = list(c.responses.create(tool_choice=choice, stream=True, **kw))
        kinds = [e.type for e in events]
        assert kinds == ["response.created", "response.in_progress"] + [
            "response.output_item.added", "response.function_call_arguments.delta",
            "response.function_call_arguments.done", "response.output_item.done"] * len(want) + ["response.completed"]
        assert [(e.item.name, e.item.arguments) for e in events if e.type == "response.output_item.done"] == want
        assert [e.delta for e in events if e.type == "response.function_call_arguments.delta"] == [a for _, a in want]
        assert [(o.name, o.arguments) for o in events[-1].response.output] == want
    # the next turn: the call and its output as input items, answered in words (as chat answers
    # the same conversation)
    call = r.output[0]
    result = '{"temperature": 21, "sky": "clear"}'
    items = [{"role": "user", "content": ask},
             {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": result}]
    r = c.responses.create(model=MODEL, input=items, tools=[rtool], tool_choice="none", temperature=0,
                           max_output_tokens=30)
    chat = c.chat.completions.create(model=MODEL, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=30,
                                     messages=[{"role": "user", "content": ask},
                                               {"role": "assistant", "content": None, "tool_calls": [
                                                   {"id": call.call_id, "type": "function",
                                                    "function": {"name": call.name, "arguments": call.arguments}}]},
                                               {"role": "tool", "tool_call_id": call.call_id, "content": result}])
    assert r.output_text == chat.choices[0].message.content and r.usage.input_tokens == chat.usage.prompt_tokens
    for bad in ({"previous_response_id": "resp_x"}, {"background": True},
                {"tools": [{"type": "web_search"}]}, {"input": [{"type": "function_call_output"}]},
                {"tools": [rtool]}, {"tools": [rtool], "tool_choice": "sometimes"},  # "auto" needs a parser here
                {"tools": [{"type": "function", "description": "no name"}], "tool_choice": "required"},
                {"tools": [rtool], "tool_choice": {"type": "function", "name": "nope"}},
                {"tools": [rtool], "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
                {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}):
        with pytest.raises(openai.BadRequestError):
            c.responses.create(**{"model": MODEL, "input": "hi", "max_output_tokens": 4, **bad})


def test_tokenize_detokenize_and_model_retrieve(served, engine):
    """vLLM's /tokenize and /detokenize count tokens as the server does (a prompt as the engine
    encodes it, chat messages as the chat endpoint renders them: the same count as its usage);
    the openai client's models.retrieve gets the model card, or NotFoundError."""
    c = served.client()
    r = httpx.post(served.base + "/tokenize", json={"model": MODEL, "prompt": "Hello there, world"}, timeout=30)
    assert r.status_code == 200 and r.json()["tokens"] == engine.encode("Hello there, world")
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    r = httpx.post(served.base + "/tokenize", json={"messages": msgs}, timeout=30).json()
    assert r["tokens"] == engine.encode_chat(msgs) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] > 0
    assert c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1).usage.prompt_tokens == r["count"]
    back = httpx.post(served.base + "/detokenize", json={"model": MODEL, "tokens": r["tokens"]}, timeout=30).json()
    assert back["prompt"] == engine.tokenizer.hf.decode(r["tokens"]) and "What is 2+2?" in back["prompt"]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-9")
    for path, body, status in [("/tokenize", {"model": "gpt-9", "prompt": "hi"}, 404), ("/tokenize", {}, 400),
                               ("/detokenize", {"tokens": [-1]}, 400), ("/detokenize", {"tokens": "abc"}, 422),
                               ("/tokenize", {"messages": "hi"}, 422)]:
        r = httpx.post(served.base + path, json=body, timeout=30)
        assert r.status_code == status and r.json()["error"]["message"], (path, body, r.text)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_logprobs_equal_engine(served, engine, chat):
    """logprobs through the disaggregated path (the first token's computed by the prefill worker,
    the rest by the decode worker) equal one engine's, streamed and not, in OpenAI's shapes."""
    c = served.client()
    prompt, n, k = "Name three rivers in Europe.", 24, 3
    expected = ref(engine, prompt, n, chat=chat, logprobs=k, ignore_eos=True)
    kw = dict(model=MODEL, max_tokens=n, temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})

    def flatten(lp):  # -> [(token, logprob, {alternative: logprob})]
        if chat:
            return [(e.token, e.logprob, {a.token: a.logprob for a in e.top_logprobs}) for e in lp.content]
        return [(t, v, dict(top)) for t, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)]

    if chat:
        msgs = [{"role": "user", "content": prompt}]
        full = c.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=k, **kw)
        chunks = list(c.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=k, stream=True, **kw))
        assert all(e.bytes == list(e.token.encode()) for e in full.choices[0].logprobs.content)
    else:
        full = c.completions.create(prompt=prompt, logprobs=k, **kw)
        chunks = list(c.completions.create(prompt=prompt, logprobs=k, stream=True, **kw))
        lp = full.choices[0].logprobs  # each token's offset in the text: the tokens before it
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(lp.tokens))]
        streamed_offsets = [o for ch in chunks if ch.choices and ch.choices[0].logprobs
                            for o in ch.choices[0].logprobs.text_offset]
        assert streamed_offsets == lp.text_offset
    got = flatten(full.choices[0].logprobs)
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in flatten(ch.choices[0].logprobs)]
    assert full.choices[0].model_extra["token_ids"] == expected.token_ids
    texts = engine.tokenizer.token_texts(expected.token_ids)
    assert [t for t, _, _ in got] == [t for t, _, _ in streamed] == texts
    for (t, v, top), (sv, stop_), (want, alts) in zip(got, [(v, a) for _, v, a in streamed], expected.logprobs):
        assert v == pytest.approx(want, abs=1e-4) and sv == pytest.approx(want, abs=1e-4)
        alt = dict(zip(engine.tokenizer.token_texts([a for a, _ in alts]), (x for _, x in alts)))
        if not chat:
            alt[t] = want  # the legacy API's top_logprobs also hold the sampled token
        assert top.keys() == stop_.keys() == alt.keys()
        assert all(top[a] == pytest.approx(alt[a], abs=1e-4) for a in alt)
    assert len(got) == n and full.usage.completion_tokens == n
    # without the field, no logprobs
    plain = c.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_echo_logprobs_score_a_prompt_as_lm_eval_does(served, engine):
    """echo + logprobs (what lm-eval's loglikelihood tasks send): the prompt comes back with each of
    its tokens' log-probability (the first: null), computed by the prefill worker, equal to one
    engine's; streamed, the prompt's chunk comes first."""
    c = served.client()
    ctx, cont = "The capital of France is", " Paris"
    prompt = ctx + cont
    ids = engine.encode(prompt)
    n = len(ids)
    expected = engine.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=1, logprobs=1))[0]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    r = c.completions.create(**kw)
    ch = r.choices[0]
    assert ch.text == prompt + expected.text
    lp = ch.logprobs
    assert len(lp.tokens) == n + 1 and lp.tokens[:n] == engine.tokenizer.token_texts(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(1, n):
        assert lp.token_logprobs[j] == pytest.approx(expected.prompt_logprobs[j][0], abs=1e-4)
        assert lp.tokens[j] in lp.top_logprobs[j]  # the legacy top_logprobs hold the token itself
    assert lp.token_logprobs[n] == pytest.approx(expected.logprobs[0][0], abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(n + 1)]
    # the continuation's log-likelihood, as lm-eval sums it, and whether it is the greedy choice
    k = len(engine.encode(ctx))
    assert ids[:k] == engine.encode(ctx)
    ll = sum(lp.token_logprobs[k:n])
    assert ll == pytest.approx(sum(expected.prompt_logprobs[j][0] for j in range(k, n)), abs=1e-3) and ll < 0
    chunks = [x for x in c.completions.create(stream=True, **kw) if x.choices]
    first = chunks[0].choices[0]
    assert first.text == prompt and first.logprobs.tokens == lp.tokens[:n]
    streamed = [v for x in chunks if x.choices[0].logprobs for v in x.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    assert "".join(x.choices[0].text for x in chunks) == ch.text
    # lm-eval's own request: prompts as token ids, two in one call, parsed as lm-eval parses them
    ids2 = engine.encode("The capital of Germany is Berlin")
    body = {"model": MODEL, "prompt": [ids, ids2], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    out = httpx.post(served.url + "/completions", json=body, timeout=300).json()
    for choice, toks in zip(sorted(out["choices"], key=lambda c: c["index"]), [ids, ids2]):
        want = engine.generate(toks, SamplingParams(max_tokens=1, prompt_logprobs=1))[0].prompt_logprobs
        lps, tops = choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"]
        assert len(lps) == len(toks) + 1 and choice["text"].startswith(engine.decode(toks))
        ctxlen = len(toks) - 1  # the last prompt token is the continuation
        assert sum(lps[ctxlen:-1]) == pytest.approx(want[-1][0], abs=1e-4)
        is_greedy = all(v == max(top.values()) for v, top in zip(lps[ctxlen:-1], tops[ctxlen:-1]))
        assert is_greedy == (want[-1][1][0][0] == toks[-1])
    # echo without logprobs: the prompt, no logprobs
    plain = c.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True).choices[0]
    assert plain.text == ch.text and plain.logprobs is None


def test_sixteen_concurrent_streams(served, engine):
    prompts = [f"Tell me fact number {i} about the ocean." for i in range(16)]
    refs = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))  # one batch
    expected = {p: r.text for p, r in zip(prompts, refs)}
    c = served.client()

    def one(p):
        s = c.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0, stream=True,
                                 extra_body={"ignore_eos": True})
        return p, "".join(ch.choices[0].text for ch in s if ch.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        got = dict(ex.map(one, prompts))
    assert got == expected


BAD = [
    ("completions", b"{not json", 400),
    ("completions", b"[1, 2]", 400),
    ("chat/completions", json.dumps({"model": MODEL, "messages": "hello"}).encode(), 422),
    ("chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).encode(), 422),
    ("completions", json.dumps({"model": "gpt-9", "prompt": "hi"}).encode(), 404),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -5}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "many"}).encode(), 422),
    ("completions", json.dumps({"model": MODEL, "prompt": [1] * 9000}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": ""}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "temperature": 7}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": "x" * (5 << 20)}).encode(), 413),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "logprobs": 21}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "logprobs": True}).encode(), 400),
    ("chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "top_logprobs": 2}).encode(), 400),
    ("chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "logprobs": True, "top_logprobs": 21}).encode(), 400),
    ("chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "logprobs": 3}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "logit_bias": {"x": 1}}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 300}}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "logit_bias": {"999999": 1}}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "top_k": -3}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "min_p": 2}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "suffix": "end"}).encode(), 400),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "min_tokens": 50, "max_tokens": 10}).encode(), 400),
    # structured outputs: a constraint that does not compile, or two of them, is refused before
    # any worker sees it (also when streamed: no 200 first)
    *[("chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}).encode(),
       400) for extra in [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
         "stream": True},
        {"response_format": {"type": "json_schema", "json_schema": "not an object"}},
        {"response_format": {"type": "yaml"}},
        {"response_format": {"type": "json_object"}, "guided_regex": "a+"},
        {"guided_json": "{not json"},
        {"guided_regex": "(unclosed"},
        {"guided_choice": []},
        {"structured_outputs": {"grammar": "root ::= missing_rule"}},
        {"response_format": {"type": "json_object"}, "min_tokens": 2},
        # tools: a forced call with logprobs, or with a response_format, tools with one name twice
        {"tools": [WEATHER], "tool_choice": "required", "logprobs": True},
        {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
        {"tools": [WEATHER, WEATHER], "tool_choice": "required"},
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": "get_weather"}},
        {"messages": [{"role": "assistant", "content": None, "tool_calls": 5}, {"role": "user", "content": "hi"}]},
        # vLLM's fields this server cannot honour, and misused ones it does
        {"chat_template": "{{ messages }}"}, {"use_beam_search": True}, {"spaces_between_special_tokens": False},
        {"priority": 1}, {"cache_salt": ""}, {"logits_processors": ["my.module:Proc"]},
        {"continue_final_message": True},  # the last message is not the assistant's
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}],
         "continue_final_message": True, "add_generation_prompt": True},
        {"chat_template_kwargs": {"add_generation_prompt": False}},
        {"allowed_token_ids": []}, {"allowed_token_ids": [10 ** 9]}, {"truncate_prompt_tokens": 0},
    ]],
    # the Responses API's tools and items: malformed ones are refused before any worker runs them
    *[("responses", json.dumps({"model": MODEL, "input": "hi", "max_output_tokens": 4, **extra}).encode(), 400)
      for extra in [
          {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}}]},
          {"input": [{"type": "function_call_output", "call_id": "c", "output": {"a": 1}}]},
          {"tools": [{"type": "function", "name": "f", "parameters": "not an object"}], "tool_choice": "required"},
          {"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function"}},
          {"tools": [{"type": "function", "name": "f"}, {"type": "function", "name": "f"}], "tool_choice": "required"},
      ]],
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "truncate_prompt_tokens": -2}).encode(), 422),
    ("completions", json.dumps({"model": MODEL, "prompt": "hi", "allowed_token_ids": ["a"]}).encode(), 422),
    ("responses", json.dumps({"model": MODEL, "input": "hi", "text": {"format": "json"}}).encode(), 400),
    ("responses", json.dumps({"model": MODEL, "input": []}).encode(), 400),
    ("responses", json.dumps({"model": MODEL, "input": ["hi"]}).encode(), 422),
    ("chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "tools": [{"type": "function", "function": {"description": "no name"}}],
                                     "tool_choice": "required"}).encode(), 422),
    ("chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "echo": True}).encode(), 400),
]


@pytest.mark.parametrize("path,body,status", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_openai_error(served, path, body, status):
    r = httpx.post(f"{served.url}/{path}", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == status
    assert httpx.get(served.base + "/health", timeout=30).status_code == 200


def test_openai_client_raises_typed_errors(served):
    c = served.client()
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=4)
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_client_disconnect_aborts_and_frees_blocks(served):
    from tests.serving.conftest import wait_until
    before = served.stats()["workers"]
    aborted_before = sum(w["aborted"] for w in before.values())
    body = {"model": MODEL, "prompt": "Tell me a very long story about dragons.", "max_tokens": 3000,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", served.url + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                got += 1
            if got >= 3:
                break
    # the connection is closed now; both workers must drop the request and free every block
    def all_free():
        ws = served.stats()["workers"]
        ok = all(w["running"] == 0 and w["held"] == 0 and w["free_blocks"] == w["total_blocks"] for w in ws.values())
        return ws if ok else None
    ws = wait_until(all_free, 30)
    assert sum(w["aborted"] for w in ws.values()) > aborted_before


def test_metrics_endpoint(served):
    text = httpx.get(served.base + "/metrics", timeout=30).text
    for name in ("lmdisagg_requests_total", "lmdisagg_time_to_first_token_seconds_bucket",
                 "lmdisagg_inter_token_latency_seconds_bucket", "lmdisagg_e2e_request_latency_seconds_bucket",
                 "lmdisagg_kv_transfer_bytes", "lmdisagg_requests_in_flight", "lmdisagg_cached_prompt_tokens_total"):
        assert name in text, name
