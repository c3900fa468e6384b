"""Tool-call parsers for ``tool_choice: "auto"``: the model writes calls in its own format, and
the router reads them back out of its text (vLLM's ``--tool-call-parser``).

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one block per call, after
                 optional content (Qwen2/2.5, Hermes, SmolLM3 and most chat templates with tools)
    llama3_json  {"name": ..., "parameters": {...}} as the whole answer, several joined by ";",
                 optionally after <|python_tag|> (Llama 3.1-3.3 JSON tool calling)
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] as the whole answer
                 ([TOOL_CALLS] is a special token: requests keep special tokens in their text, as
                 vLLM does for this format; a tokenizer without it shows only the array)

Streamed or not, a choice's text goes through one ``ToolStream``: ``feed`` returns the content
that can be shown now (text before any call; a part that may begin a call is held back), and
``finish`` returns the rest and the calls. Text after the start of a call is held until the end;
if it does not parse as calls (a model that starts a call and writes prose, ``max_tokens``
cutting it), all of it is content, so nothing the model wrote is lost.
"""
from __future__ import annotations

import json
import re


def _call(obj, keys=("arguments", "parameters")) -> tuple[str, str] | None:
    """(name, arguments as JSON text) from a parsed call object, or None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


class ToolParser:
    name = ""
    markers: tuple[str, ...] = ()  # text that begins a call
    anywhere = False  # hermes: a call may follow content; the others: the answer starts with it
    keep_special = False  # the marker is a special token: the text keeps special tokens (as vLLM)

    def call_start(self, text: str, frm: int = 0) -> int | None:
        """Where a call begins in ``text`` (None: none yet); ``frm``: none begins before it."""
        if self.anywhere:
            found = [i for i in (text.find(m, frm) for m in self.markers) if i >= 0]
            return min(found) if found else None
        s = text.lstrip()
        return len(text) - len(s) if s.startswith(self.markers) else None

    def held(self, text: str) -> int:
        """How many characters at the end of ``text`` might be the first part of a marker."""
        tail = text.lstrip() if not self.anywhere else text
        for n in range(min(len(tail), max(map(len, self.markers))), 0, -1):
            if any(m.startswith(tail[-n:]) for m in self.markers) and (self.anywhere or n == len(tail)):
                return n
        return 0

    def parse(self, text: str) -> list[tuple[str, str]] | None:
        """The calls in ``text`` (which begins with a marker); None if it is not calls."""
        raise NotImplementedError

    def render(self, calls: list[tuple[str, dict]]) -> str:
        """An assistant turn's calls written the way the model writes them (for chat templates
        that do not render ``tool_calls`` themselves)."""
        raise NotImplementedError


class Hermes(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    anywhere = True
    _block = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def parse(self, text):
        calls = []
        for closed, open_ in self._block.findall(text):
            try:
                c = _call(json.loads(closed or open_))
            except ValueError:
                return None
            if c is None:
                return None
            calls.append(c)
        return calls or None

    def render(self, calls):
        return "\n".join("<tool_call>\n" + json.dumps({"name": n, "arguments": a}, ensure_ascii=False) + "\n</tool_call>"
                         for n, a in calls)


class Llama3Json(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")

    def parse(self, text):
        s = text.strip().removeprefix("<|python_tag|>")
        dec, pos, calls = json.JSONDecoder(), 0, []
        while True:
            while pos < len(s) and (s[pos].isspace() or s[pos] == ";"):
                pos += 1
            if pos == len(s):
                return calls or None
            try:
                obj, pos = dec.raw_decode(s, pos)
            except ValueError:
                return None
            c = _call(obj, ("parameters", "arguments"))
            if c is None:
                return None
            calls.append(c)

    def render(self, calls):
        return "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)


class Mistral(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]", "[")
    keep_special = True

    def parse(self, text):
        try:
            items = json.loads(text.strip().removeprefix("[TOOL_CALLS]"))
        except ValueError:
            return None
        calls = [_call(it) for it in items] if isinstance(items, list) else [None]
        return calls if calls and None not in calls else None

    def render(self, calls):
        return "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in calls], ensure_ascii=False)


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (Hermes, Llama3Json, Mistral)}


def make_parser(name: str | None, chat_template: str | None) -> ToolParser | None:
    """The configured parser, else the one the chat template's own call format names (None if it
    names none: tool_choice "auto" is then refused)."""
    if name:
        if name not in PARSERS:
            raise ValueError(f"unknown tool-call parser {name!r}; choose one of {sorted(PARSERS)}")
        return PARSERS[name]()
    t = chat_template or ""
    if "<tool_call>" in t:
        return Hermes()
    if "[TOOL_CALLS]" in t:
        return Mistral()
    if "<|python_tag|>" in t:
        return Llama3Json()
    return None


class ToolStream:
    """One choice's text, split into content and calls as it arrives (see the module doc)."""

    def __init__(self, parser: ToolParser, parallel: bool = True):
        self.p, self.parallel = parser, parallel
        self.text = ""
        self.sent = 0  # characters of text already given out as content
        self.start: int | None = None  # where a call begins
        self.decided = False  # a parser whose calls open the answer has seen its first character
        self.words = -1  # where the first non-whitespace character is (-1: none yet)
        self._marker = max(map(len, parser.markers))

    def feed(self, delta: str) -> str:
        """The content that can be shown now (each call looks only at the new text and the few
        characters before it that a marker could start in)."""
        old = len(self.text)
        self.text += delta
        if self.words < 0 and delta.strip():
            self.words = old + len(delta) - len(delta.lstrip())
        if self.start is not None:
            return ""
        if not self.p.anywhere and self.decided:
            return self._give(len(self.text))
        self.start = self.p.call_start(self.text, max(0, old - self._marker + 1))
        if self.start is not None:
            return self._give(self.start)
        held = self.p.held(self.text[-self._marker:] if self.p.anywhere else self.text)
        if not self.p.anywhere and self.words >= 0 and held == 0:
            self.decided = True  # the answer is content
        return self._give(len(self.text) - held)

    def _give(self, end: int) -> str:
        if end <= self.sent or not 0 <= self.words < end:  # leading whitespace waits for words
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def finish(self) -> tuple[str, list[tuple[str, str]]]:
        """(the content not given out yet, the calls)."""
        calls = self.p.parse(self.text[self.start:]) if self.start is not None else None
        if calls:
            return "", calls if self.parallel else calls[:1]
        out, self.sent = self.text[self.sent:], len(self.text)
        return out, []
