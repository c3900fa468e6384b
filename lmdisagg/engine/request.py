"""Requests as the engine sees them: sampling parameters, the live sequence, and step outputs."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from lmdisagg.engine.structured import normalize as normalize_structured
from lmdisagg.errors import InvalidRequestError


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API allows

# One generated token's log-probability under the model (its raw logits, before temperature and
# top_p) and the ``logprobs`` most likely tokens' [(token id, log-probability)], most likely first.
TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None           # seeds this request's own generator (reproducible sampling)
    stop: tuple[str, ...] = ()        # stop strings; the matched text is not returned
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False          # keep going past EOS (benchmark clients)
    logprobs: int | None = None       # log-probability of each generated token and of this many
    #                                   most likely alternatives (0..MAX_LOGPROBS); None: none
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (all but the first), with
    #                                   the first output; the prompt is then computed whole (no cache)
    # logits processing, in this order (as vLLM): logit_bias, the penalties; then greedy takes the
    # argmax, sampling applies temperature, min_p, top_k, top_p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit in [-100, 100]); or a dict
    repetition_penalty: float = 1.0   # > 0; tokens of prompt + output: logit / p if > 0 else * p
    frequency_penalty: float = 0.0    # [-2, 2]; minus this times the token's count in the output
    presence_penalty: float = 0.0     # [-2, 2]; minus this once for a token in the output
    min_p: float = 0.0                # [0, 1]; drop tokens under min_p times the top probability
    top_k: int = 0                    # keep the k most likely tokens; 0 or -1: all
    min_tokens: int = 0               # no EOS, stop token or stop string before this many tokens (vLLM)
    allowed_token_ids: tuple[int, ...] = ()  # sample only among these tokens (vLLM); empty: all
    skip_special_tokens: bool = True  # False: special tokens' text stays in the output text (vLLM)
    # not sampling, but carried with the request everywhere the params go (handoff, resume, store
    # loads): its prefix-cache chunks are shared only with requests of the same salt (lmdisagg.kv.keys)
    cache_salt: str | None = None
    # structured outputs (lmdisagg.engine.structured): (kind, spec), kind "json" (a JSON schema, as
    # text or a dict; "" any JSON object), "regex", "choice" (a list of strings) or "grammar" (EBNF)
    structured: tuple[str, str] | None = None

    def __post_init__(self):
        if isinstance(self.logit_bias, dict):  # {token id: bias}, as the OpenAI API sends it
            object.__setattr__(self, "logit_bias", tuple(self.logit_bias.items()))
        if isinstance(self.allowed_token_ids, list):
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if self.structured is not None:  # the spec as text (a malformed one is refused by validate)
            try:
                object.__setattr__(self, "structured", normalize_structured(self.structured))
            except InvalidRequestError:
                pass

    @property
    def processes_logits(self) -> bool:
        """True when the logits are changed before sampling (not only temperature / top_p)."""
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 \
            or self.presence_penalty != 0.0 or self.min_tokens > 0 or self.structured is not None \
            or bool(self.allowed_token_ids)

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}",
                                      param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError(f"temperature must be in [0, 2], got {self.temperature}", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be non-empty strings", param="stop")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}", param=name)
        if not self.repetition_penalty > 0.0:
            raise InvalidRequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                                      param="repetition_penalty")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1, 0 (all tokens) or a positive integer, got {self.top_k!r}",
                                      param="top_k")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) \
                or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got "
                                      f"{self.min_tokens!r}", param="min_tokens")
        for pair in self.logit_bias if isinstance(self.logit_bias, tuple) else [self.logit_bias]:
            tok, bias = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
            if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0 \
                    or not isinstance(bias, (int, float)) or not -100.0 <= bias <= 100.0:
                raise InvalidRequestError(f"logit_bias maps token ids to values in [-100, 100] ({{id: bias}} or "
                                          f"((id, bias), ...)), got {pair!r}", param="logit_bias")
        if not isinstance(self.allowed_token_ids, tuple) or any(
                not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.allowed_token_ids):
            raise InvalidRequestError(f"allowed_token_ids must be a list of token ids, got {self.allowed_token_ids!r}",
                                      param="allowed_token_ids")
        if not isinstance(self.skip_special_tokens, bool):
            raise InvalidRequestError("skip_special_tokens must be true or false", param="skip_special_tokens")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt
                                            or len(self.cache_salt) > 1024):
            raise InvalidRequestError("cache_salt must be a non-empty string (at most 1024 characters)",
                                      param="cache_salt")
        if self.structured is not None:
            normalize_structured(self.structured)
            if self.min_tokens:  # a complete output may only be followed by EOS, which min_tokens bans
                raise InvalidRequestError("min_tokens cannot be combined with structured outputs", param="min_tokens")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or isinstance(self.prompt_logprobs, bool)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], "
                                      f"got {self.prompt_logprobs!r}", param="prompt_logprobs")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
                                      param="logprobs")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request inside the engine. Token ids are prompt + generated, in order."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)  # block ids, one per chunk of tokens
    num_cached_tokens: int = 0        # prompt tokens found in the prefix cache at admission
    num_computed_tokens: int = 0      # tokens whose KV is in the cache
    text: str = ""                    # detokenized output so far (stop strings trimmed)
    num_text_emitted: int = 0         # chars of ``text`` already returned
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    generator: torch.Generator | None = None
    chunk_keys: list = field(default_factory=list)  # keys of full chunks of token_ids, computed lazily
    num_registered: int = 0           # leading blocks already named by their chunk key
    prefill_only: bool = False        # stop after the first token and hold the blocks for export
    prompt_logprobs: list | None = None  # computed with the prompt when params.prompt_logprobs is set
    min_tokens_ban: tuple[int, ...] = ()  # tokens that may not come before params.min_tokens (EOS, stop ids)
    stop_from: int = 0                # stop strings are matched in text ending past this character
    grammar: object = None            # structured.GrammarState when params.structured is set
    seen: torch.Tensor | None = None  # repetition_penalty: [vocab] mask of the tokens in token_ids[:num_seen]
    num_seen: int = 0
    allowed: torch.Tensor | None = None  # allowed_token_ids: [vocab] 0 for them, -inf for the rest

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt's logprobs are still to be computed: asked for, and no output yet (a
        preempted or resumed sequence already returned them)."""
        return self.params.prompt_logprobs is not None and len(self.token_ids) == self.num_prompt_tokens

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class RequestOutput:
    """What one step produced for one request (deltas since the previous output)."""

    request_id: str
    new_token_ids: list[int]          # tokens generated this step
    text_delta: str                   # text those tokens completed (may lag a token for UTF-8)
    finished: bool
    finish_reason: str | None         # set when finished
    prompt_tokens: int
    cached_tokens: int                # prompt tokens served from the prefix cache
    completion_tokens: int            # generated so far
    prefill_done: bool = False        # a prefill_only request finished its prefill (blocks held)
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first token: one per prompt
    #                                   token, None for the first (params.prompt_logprobs)
