"""Structured outputs: generation constrained to a JSON schema, a regex, a list of choices or an
EBNF grammar, through xgrammar (the grammar engine vLLM and SGLang use).

``SamplingParams.structured`` names the constraint as ``(kind, spec)``:

    ("json", schema)      a JSON schema as text; "" for any JSON object (json_object)
    ("regex", pattern)    the whole output matches the pattern
    ("choice", options)   one of the strings, given as a JSON list
    ("grammar", ebnf)     an EBNF grammar with a ``root`` rule (xgrammar's GBNF dialect)

Each sequence has a matcher. Before a token is sampled, the tokens the grammar cannot take next
get -inf (after logit_bias and the penalties, before temperature / top_k / top_p / greedy); once
the grammar is complete only EOS may follow. The matcher is fed the sequence's output tokens
lazily, at the next mask: so a request continued on another worker (a prefill handed to decode,
a migrated or resumed request) replays its earlier tokens into a fresh matcher and goes on
exactly where the first worker stopped.
"""
from __future__ import annotations

import json
import logging

import torch

from lmdisagg.errors import InvalidRequestError

log = logging.getLogger(__name__)

KINDS = ("json", "regex", "choice", "grammar")
CACHE_BYTES = 64 << 20  # compiled grammars kept per process
PARAM = {"json": "response_format", "regex": "guided_regex", "choice": "guided_choice", "grammar": "guided_grammar"}


def normalize(structured) -> tuple[str, str] | None:
    """(kind, spec) with the spec as text: a dict schema or a list of choices is dumped to JSON."""
    if structured is None:
        return None
    if not (isinstance(structured, (tuple, list)) and len(structured) == 2):
        raise InvalidRequestError(f"structured must be (kind, spec) with kind one of {KINDS}, got {structured!r}",
                                  param="structured")
    kind, spec = structured
    if kind not in KINDS:
        raise InvalidRequestError(f"structured kind must be one of {KINDS}, got {kind!r}", param="structured")
    if kind == "json" and isinstance(spec, dict):
        spec = json.dumps(spec)
    elif kind == "choice" and isinstance(spec, (list, tuple)):
        spec = json.dumps(list(spec))
    if not isinstance(spec, str):
        raise InvalidRequestError(f"the {kind} constraint must be text, got {type(spec).__name__}", param=PARAM[kind])
    if kind == "choice":
        try:
            options = json.loads(spec)
        except ValueError:
            options = None
        if not (isinstance(options, list) and options and all(isinstance(o, str) and o for o in options)):
            raise InvalidRequestError("guided_choice must be a non-empty list of non-empty strings",
                                      param="guided_choice")
    elif kind != "json" and not spec:
        raise InvalidRequestError(f"the {kind} constraint is empty", param=PARAM[kind])
    return kind, spec


class Grammars:
    """One per engine (and one in the router, to refuse a bad constraint with 400 before any
    worker sees it): compiles constraints against the model's vocabulary, cached by xgrammar."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids):
        try:
            import xgrammar as xgr
        except ImportError as e:
            raise InvalidRequestError("structured outputs need xgrammar on the server "
                                      "(pip install 'lmdisagg[serve]' or xgrammar)") from e
        self.xgr = xgr
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(sorted(stop_token_ids))
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(self.stop_token_ids))
        # the cache is bounded: a server sees a new schema per client, for as long as it runs. The
        # compiler may be called from several threads at once (as vLLM's compile pool does), and
        # releases the GIL while it compiles (a large schema takes seconds: workers and the router
        # compile in a thread, so their event loops and engine steps go on)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_BYTES)

    def compile(self, structured: tuple[str, str]):
        kind, spec = structured
        try:
            if kind == "json":  # "": a JSON object, as OpenAI's json_object promises
                return self.compiler.compile_json_schema(spec or '{"type": "object"}')
            if kind == "regex":
                return self.compiler.compile_regex(spec)
            if kind == "choice":
                ebnf = "root ::= " + " | ".join(json.dumps(o) for o in json.loads(spec))
                return self.compiler.compile_grammar(ebnf)
            return self.compiler.compile_grammar(spec)
        except RuntimeError as e:  # xgrammar's parse errors
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            raise InvalidRequestError(f"invalid {kind} constraint: {msg}", param=PARAM[kind]) from None

    def state(self, structured: tuple[str, str]) -> "GrammarState":
        return GrammarState(self, self.compile(structured))


class GrammarState:
    """One sequence's matcher."""

    __slots__ = ("g", "matcher", "fed", "broken")

    def __init__(self, grammars: Grammars, compiled):
        self.g = grammars
        self.matcher = grammars.xgr.GrammarMatcher(compiled)
        self.fed = 0  # output tokens accepted so far
        self.broken = False

    def fill(self, bitmask: torch.Tensor, row: int, output_ids: list[int]) -> None:
        """Set row ``row`` of an xgrammar bitmask (int32, a bit per token: allowed) to the tokens
        the grammar can take after ``output_ids`` (the sequence's output so far)."""
        m = self.matcher
        for tok in output_ids[self.fed:]:  # (once terminated, the stop tokens after it are not fed)
            if not self.broken and not m.is_terminated() and not m.accept_token(tok):
                # cannot happen for tokens sampled under this mask; never crash the step over it
                log.error("structured output: token %d does not fit the grammar; the rest of this "
                          "request is unconstrained", tok)
                self.broken = True
            self.fed += 1
        if self.broken:
            bitmask[row] = -1
        elif m.is_terminated():  # complete, and a stop token was taken (ignore_eos): only stop tokens
            bitmask[row] = 0
            for t in self.g.stop_token_ids:
                bitmask[row, t // 32] |= _bit(t % 32)
        else:
            m.fill_next_token_bitmask(bitmask, row)


def _bit(b: int) -> int:
    return 1 << b if b < 31 else -(1 << 31)  # as an int32


def apply_masks(logits: torch.Tensor, rows: list[int], states: list[GrammarState], outputs: list[list[int]]) -> None:
    """-inf, in place, on the logits [B, vocab] of ``rows`` for the tokens each row's grammar
    cannot take next: one bitmask for all of them, one copy to the logits' device, one kernel."""
    g = states[0].g
    bitmask = g.xgr.allocate_token_bitmask(logits.shape[0], g.vocab_size)  # row i masks logits row i
    for i, st, out in zip(rows, states, outputs):
        st.fill(bitmask, i, out)
    g.xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
