"""tool_choice "auto": each parser reads its model family's call format back out of the text, the
same way whole or streamed in any pieces, and gives content back untouched when it is not calls."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmdisagg.config import ClusterConfig
from lmdisagg.router.tool_parsers import PARSERS, Hermes, Llama3Json, Mistral, ToolStream, make_parser

WEATHER = ("get_weather", {"city": "Rome", "unit": "celsius"})
CLOCK = ("get_time", {"timezone": "Europe/Rome"})

# (parser, text, expected content, expected calls as (name, arguments object))
CASES = [
    (Hermes, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n</tool_call>',
     None, [WEATHER]),
    (Hermes, 'Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}'
             '</tool_call>\n<tool_call>{"name": "get_time", "arguments": "{\\"timezone\\": \\"Europe/Rome\\"}"}'
             '</tool_call>', "Let me look.\n", [WEATHER, CLOCK]),
    (Hermes, '\n\n<tool_call>{"name": "get_time", "parameters": {"timezone": "Europe/Rome"}}', None, [CLOCK]),  # unclosed: cut
    (Hermes, '<tool_call>\n"The sea is a place of endless beauty', '<tool_call>\n"The sea is a place of endless beauty', []),
    (Hermes, '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    (Hermes, "if a < b and b <tool x then <tool_cal", "if a < b and b <tool x then <tool_cal", []),
    (Hermes, "  \n", "  \n", []),
    (Llama3Json, ' {"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}; '
                 '{"name": "get_time", "parameters": {"timezone": "Europe/Rome"}}', None, [WEATHER, CLOCK]),
    (Llama3Json, '<|python_tag|>{"name": "get_time", "arguments": {"timezone": "Europe/Rome"}}', None, [CLOCK]),
    (Llama3Json, "Sure: {braces} are fine here", "Sure: {braces} are fine here", []),
    (Llama3Json, '{"name": "get_time", "parameters": {"timezone": "Eur', '{"name": "get_time", "parameters": {"timezone": "Eur', []),
    (Mistral, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}, '
              '{"name": "get_time", "arguments": {"timezone": "Europe/Rome"}}]', None, [WEATHER, CLOCK]),
    (Mistral, '[{"name": "get_time", "arguments": {"timezone": "Europe/Rome"}}]', None, [CLOCK]),  # marker skipped
    (Mistral, "[1] First, preheat the oven.", "[1] First, preheat the oven.", []),
]


def run(parser, text: str, step: int) -> tuple[str | None, list, list[str]]:
    ts = ToolStream(parser)
    shown = [ts.feed(text[k:k + step]) for k in range(0, len(text), step)]
    rest, calls = ts.finish()
    shown.append(rest)
    return "".join(shown) or None, [(n, json.loads(a)) for n, a in calls], shown


@pytest.mark.parametrize("cls,text,content,calls", CASES, ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_parse_whole_and_streamed(cls, text, content, calls):
    got_content, got_calls, _ = run(cls(), text, len(text))
    assert got_content == content and got_calls == calls
    for step in (1, 2, 5, 13):  # any way the tokens split the text gives the same answer
        assert run(cls(), text, step)[:2] == (content, calls)
    if not calls:  # nothing the model wrote is lost
        assert got_content == text


def test_content_streams_before_a_call_and_waits_only_for_a_possible_marker():
    ts = ToolStream(Hermes())
    prose = "Checking the weather now. "
    assert "".join(ts.feed(ch) for ch in prose) == prose  # shown as it came
    assert ts.feed("<tool") == ""  # may begin a call: held
    assert ts.feed("_call>") == "" and ts.feed('{"name": "get_time", "arguments": {}}') == ""
    assert ts.finish() == ("", [("get_time", "{}")])
    ts = ToolStream(Hermes())
    assert ts.feed("a <tool") == "a " and ts.feed("box>") == "<toolbox>"  # was not one: shown
    # a plain answer of the start-only formats streams once its first character rules a call out
    ts = ToolStream(Llama3Json())
    assert ts.feed("H") == "H" and ts.feed("ello {x}") == "ello {x}"
    # leading whitespace waits for words (so an answer that is only calls has no content)
    ts = ToolStream(Hermes())
    assert ts.feed("\n ") == "" and ts.feed("Hi") == "\n Hi"


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_render_reads_back(name):
    p = PARSERS[name]()
    text = p.render([WEATHER, CLOCK])
    assert run(p, text, 3)[1] == [WEATHER, CLOCK]


def test_parallel_false_keeps_the_first_call():
    text = Hermes().render([WEATHER, CLOCK])
    ts = ToolStream(Hermes(), parallel=False)
    ts.feed(text)
    assert [n for n, _ in ts.finish()[1]] == ["get_weather"]


def test_parser_from_config_or_chat_template():
    assert make_parser("llama3_json", "<tool_call>").name == "llama3_json"  # the configured one wins
    assert make_parser(None, "{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}").name == "hermes"
    assert make_parser(None, "{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert make_parser(None, "{{- '<|python_tag|>' }}").name == "llama3_json"
    assert make_parser(None, "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}") is None
    assert make_parser(None, None) is None
    with pytest.raises(ValueError, match="hermes"):
        make_parser("qwen", None)


def test_unknown_parser_is_refused_by_config_and_cli():
    config = str(Path(__file__).resolve().parents[2] / "cluster_configs" / "local-cpu.yaml")
    cfg = ClusterConfig.from_yaml(config)
    assert cfg.with_overrides(router={"tool_call_parser": "hermes"}).router.tool_call_parser == "hermes"
    with pytest.raises(Exception, match="llama3_json"):
        cfg.with_overrides(router={"tool_call_parser": "qwen"})
    # `lmdisagg serve` refuses it before starting anything
    out = subprocess.run([sys.executable, "-m", "lmdisagg.cli", "serve", "--config", config, "--tool-call-parser", "qwen"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "tool-call parser 'qwen'" in out.stdout + out.stderr


def test_calls_written_back_in_the_parsers_format_for_a_template_without_tool_calls(engine):
    """SmolLM2's template does not render an assistant turn's tool_calls: the router writes them
    into the turn's content in the parser's format (the model's own), else as JSON."""
    msgs = [{"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    tok = engine.tokenizer

    def turn(render):
        text = tok.hf.decode(tok.apply_chat_template(msgs, render_calls=render))
        return text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]

    for name, cls in PARSERS.items():
        ts = ToolStream(cls())
        assert ts.feed(turn(cls().render)) == "" and ts.finish() == ("", [("get_weather", '{"city": "Rome"}')]), name
    assert json.loads(turn(None)) == [{"name": "get_weather", "arguments": {"city": "Rome"}}]


def test_chat_template_from_a_file_or_inline_and_refused_when_neither(tmp_path):
    config = str(Path(__file__).resolve().parents[2] / "cluster_configs" / "local-cpu.yaml")
    cfg = ClusterConfig.from_yaml(config)
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert cfg.with_overrides(router={"chat_template": str(f)}).router.chat_template == f.read_text()
    inline = "{{ messages[0].content }}"
    assert cfg.with_overrides(router={"chat_template": inline}).router.chat_template == inline
    for bad in (str(tmp_path / "missing.jinja"), str(tmp_path)):
        with pytest.raises(Exception, match="chat_template"):
            cfg.with_overrides(router={"chat_template": bad})
    out = subprocess.run([sys.executable, "-m", "lmdisagg.cli", "serve", "--config", config, "--chat-template",
                          str(tmp_path / "missing.jinja")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "missing.jinja" in out.stdout + out.stderr

