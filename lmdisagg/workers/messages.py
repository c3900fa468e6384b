"""Messages between roles. Small typed dataclasses: they are all that roles exchange (KV bytes
go through a transport, never through these or Ray's object store).

    router ──GenerateRequest (+ the decode actor)──▶ PrefillWorker.prefill ──PrefillResult(first delta, KVHandle)──▶ router
           (transport.push: PrefillWorker ──GenerateRequest──▶ DecodeWorker.expect ──ticket──▶ PrefillWorker)
    router ──GenerateRequest + KVHandle──▶ DecodeWorker.decode ──TokenDelta stream──▶ router
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmdisagg.engine.request import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str                 # unique per request (per choice when n > 1)
    prompt_token_ids: list[int]     # already tokenized (chat template applied) by the router
    params: SamplingParams
    # a request resumed after its worker died: the tokens it had generated (and streamed, with
    # num_text_emitted characters of text); the new worker computes them with the prompt
    resumed: tuple[int, ...] = ()
    num_text_emitted: int = 0

    @property
    def context_token_ids(self) -> list[int]:
        """The tokens whose KV the request needs before it generates: prompt + resumed."""
        return list(self.prompt_token_ids) + list(self.resumed)


@dataclass
class TokenDelta:
    """What the client gets per step."""

    request_id: str
    token_ids: list[int]            # new tokens
    text: str                       # new text (stop strings trimmed, partial UTF-8 held back)
    finished: bool
    finish_reason: str | None       # "stop" | "length" | "abort" when finished
    prompt_tokens: int
    cached_tokens: int              # prompt tokens not computed by the worker that prefilled
    completion_tokens: int          # generated so far
    logprobs: list | None = None    # one engine.request.TokenLogprob per token, if the request asked
    prompt_logprobs: list | None = None  # with the first token, if the request asked (echo)


@dataclass
class KVHandle:
    """Where a prefilled prompt's KV lives, and what the decode side needs to continue."""

    request_id: str
    source_worker: str              # worker id of the prefill actor holding the blocks
    source_actor: object            # its Ray actor handle (to call release())
    chunk_keys: list[bytes]         # keys of the prompt's full chunks, in order
    has_tail: bool                  # a partial last block follows the full chunks
    descriptor: object              # transport-specific, picklable: where the blocks' bytes are
    layout: tuple                   # KVLayout fields; the decode side refuses a mismatch
    namespace: bytes                # KeyNamespace digest (model fingerprint, dtype, layout)
    first_token: int                # sampled by the prefill side and already streamed
    num_text_emitted: int           # characters of text already streamed
    generator_state: bytes | None = None  # torch.Generator state after the first token (sampling)
    pushed: bool = False            # the prefill worker pushed the blocks into the decode worker's expectation


@dataclass
class PrefillResult:
    first: TokenDelta               # the first token, to stream right away
    handle: KVHandle | None         # None when the first token already finished the request


@dataclass
class WorkerInfo:
    worker_id: str
    role: str                       # "prefill" | "decode" | "both"
    model: str
    max_model_len: int
    chunk_tokens: int
    num_blocks: int
    layout: tuple
    namespace: bytes
    transport: str
    node_ip: str = ""
    pid: int = 0                    # the actor's process on that node


@dataclass
class WorkerStats:
    worker_id: str
    queued_prefill_tokens: int      # prompt tokens admitted but not yet computed
    running: int                    # running sequences
    free_blocks: int
    total_blocks: int
    stats: dict = field(default_factory=dict)  # engine counters (tokens computed, cached, ...)
    queued_requests: int = 0        # requests waiting for admission
    events: list[bytes] = field(default_factory=list)  # KVEventBatch.to_msgpack() since the last poll
    pid: int = 0                    # the process that answered (a new one: Ray restarted the actor)
