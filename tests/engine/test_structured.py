"""Structured outputs on the real model: what comes out parses and fits its schema / regex /
choices / grammar (checked with jsonschema and re, not with the grammar engine that made it),
the same constraint left off gives output that does not, and a request continued on another
engine (prefill handed to decode, a resumed request) goes on exactly as on one engine."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lmdisagg.engine import SamplingParams
from lmdisagg.errors import InvalidRequestError
from tests.engine.test_disagg_handoff import decode_engine, handoff  # noqa: F401 - a fixture

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                           "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON with a name, an age and a city."}]


def test_json_schema_output_fits_the_schema(engine):
    free = engine.generate([ASK], SamplingParams(max_tokens=80), chat=True)[0]
    with pytest.raises((ValueError, jsonschema.ValidationError)):  # left alone, the model wraps it in prose
        jsonschema.validate(json.loads(free.text), PERSON)
    out = engine.generate([ASK], SamplingParams(max_tokens=80, structured=("json", PERSON)), chat=True)[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), PERSON)
    # sampled: every seed fits, at a temperature where free text would not
    for seed in range(4):
        s = engine.generate([ASK], SamplingParams(max_tokens=80, temperature=1.2, seed=seed,
                                                  structured=("json", json.dumps(PERSON))), chat=True)[0]
        assert s.finish_reason == "stop", s.text
        jsonschema.validate(json.loads(s.text), PERSON)
    # json_object: any JSON object
    any_json = engine.generate([ASK], SamplingParams(max_tokens=80, structured=("json", "")), chat=True)[0]
    assert any_json.finish_reason == "stop" and isinstance(json.loads(any_json.text), dict)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_regex_choice_and_grammar(engine):
    prompt = "My phone number is"
    free = engine.generate(prompt, SamplingParams(max_tokens=12))[0].text
    pattern = r" \(\d{3}\) \d{3}-\d{4}"
    assert not re.fullmatch(pattern, free)
    out = engine.generate(prompt, SamplingParams(max_tokens=30, structured=("regex", pattern)))[0]
    assert re.fullmatch(pattern, out.text) and out.finish_reason == "stop"
    options = ["positive", "negative", "neutral"]
    ask = [{"role": "user", "content": "Is 'I loved this film' positive or negative?"}]
    out = engine.generate([ask], SamplingParams(max_tokens=10, structured=("choice", options)), chat=True)[0]
    assert out.text in options and out.finish_reason == "stop"
    ebnf = 'root ::= "SELECT " col (", " col)? " FROM " table ";"\ncol ::= "id" | "name" | "email"\n' \
           'table ::= "users" | "orders"'
    out = engine.generate("Write SQL:", SamplingParams(max_tokens=40, structured=("grammar", ebnf)))[0]
    assert re.fullmatch(r"SELECT (id|name|email)(, (id|name|email))? FROM (users|orders);", out.text), out.text


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_handed_off_request_goes_on_under_its_grammar(engine, decode_engine, temperature):  # noqa: F811
    """The prefill engine samples the first token under the grammar; the decode engine makes a
    fresh matcher, replays that token, and goes on: the tokens equal one engine's."""
    prompt = engine.encode_chat(ASK)
    params = SamplingParams(max_tokens=60, temperature=temperature, seed=11, structured=("json", PERSON))
    ref = engine.generate(prompt, params)[0]
    jsonschema.validate(json.loads(ref.text), PERSON)
    tokens, text, _ = handoff(engine, decode_engine, f"structured-{temperature}", prompt, params)
    assert tokens == ref.token_ids and text == ref.text


def test_resumed_request_replays_its_tokens_into_the_grammar(engine):
    """A request resumed elsewhere with tokens it already generated (a migration) goes on from
    the grammar state those tokens reached, not from the start."""
    prompt = engine.encode_chat(ASK)
    params = SamplingParams(max_tokens=60, structured=("json", PERSON))
    ref = engine.generate(prompt, params)[0]
    k = 7
    engine.add_request("resumed-structured", prompt, params, resumed=ref.token_ids[:k],
                       num_text_emitted=len(engine.decode(ref.token_ids[:k])))
    tokens = list(ref.token_ids[:k])
    while engine.has_unfinished():
        for o in engine.step():
            tokens += o.new_token_ids
    assert tokens == ref.token_ids


@pytest.mark.parametrize("structured,param", [
    (("json", '{"type": "nonsense"}'), "response_format"),
    (("json", "{not json"), "response_format"),
    (("regex", "(unclosed"), "guided_regex"),
    (("choice", []), "guided_choice"),
    (("choice", ["a", 3]), "guided_choice"),
    (("grammar", "root ::= undefined_rule"), "guided_grammar"),
    (("yaml", "a: b"), "structured"),
    ("json", "structured"),
])
def test_bad_constraints_are_refused(engine, structured, param):
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("bad-structured", [1, 2, 3], SamplingParams(structured=structured))
    assert e.value.param == param
    assert not engine.has_unfinished()


def test_min_tokens_cannot_combine_with_a_grammar(engine):
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        engine.add_request("bad-min", [1, 2, 3], SamplingParams(min_tokens=3, structured=("json", "")))


def test_ignore_eos_after_a_complete_output_gives_only_stop_tokens(engine):
    """Once the grammar is complete only a stop token may follow; with ignore_eos (benchmark
    clients) the request goes on to max_tokens with stop tokens only, and the text stays the JSON."""
    params = SamplingParams(max_tokens=80, structured=("json", PERSON))
    ref = engine.generate([ASK], params, chat=True)[0]
    assert ref.finish_reason == "stop" and ref.token_ids[-1] in engine.eos_token_ids
    r = engine.generate([ASK], SamplingParams(max_tokens=len(ref.token_ids) + 6, ignore_eos=True,
                                              structured=("json", PERSON)), chat=True)[0]
    assert r.token_ids[:len(ref.token_ids)] == ref.token_ids and r.finish_reason == "length"
    assert len(r.token_ids) == len(ref.token_ids) + 6
    assert all(t in engine.eos_token_ids for t in r.token_ids[len(ref.token_ids):])
    jsonschema.validate(json.loads(r.text), PERSON)


def test_cli_structured_flags_equal_the_engine(engine, tmp_path):
    """`lmdisagg generate --json-schema @file` / `--choice` give the engine's constrained output;
    a constraint that does not compile ends the command with its error, exit code 2."""
    import subprocess
    import sys
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "lmdisagg.cli", "generate", "--max-tokens", "60", "--json", *args],
                              capture_output=True, text=True, timeout=300)

    out = cli("--prompt", ASK[0]["content"], "--chat", "--json-schema", f"@{schema}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = engine.generate([ASK], SamplingParams(max_tokens=60, structured=("json", PERSON)), chat=True)[0]
    assert got["token_ids"] == want.token_ids
    jsonschema.validate(json.loads(got["text"]), PERSON)
    out = cli("--prompt", "My favourite colour is", "--choice", "teal", "--choice", "ochre")
    assert json.loads(out.stdout.strip().splitlines()[-1])["text"] in ("teal", "ochre")
    out = cli("--prompt", "hi", "--regex", "(unclosed")
    assert out.returncode == 2 and "regex" in out.stderr
