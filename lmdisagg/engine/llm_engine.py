"""The built-in engine: a paged-KV PyTorch runner for the Llama family.

    step(): schedule (admit prefills, reserve decode slots) → run (one forward) → postprocess
            (append tokens, name full chunks, detokenize, stop checks, free finished)
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from lmdisagg.engine.base import EngineBase
from lmdisagg.engine.block_manager import BlockManager
from lmdisagg.engine.config import EngineConfig
from lmdisagg.engine.model_runner import ModelRunner
from lmdisagg.engine.request import RequestOutput, SamplingParams, Sequence, Status
from lmdisagg.engine.scheduler import Scheduler
from lmdisagg.engine.structured import Grammars
from lmdisagg.errors import ContextLengthError, InvalidRequestError, LmdisaggError, OutOfBlocksError
from lmdisagg.kv.keys import ChunkKey, KeyNamespace, chunk_keys, salt_root
from lmdisagg.kv.layout import KVLayout, torch_dtype
from lmdisagg.models import resolve_model
from lmdisagg.engine.loader import Tokenizer, fingerprint, load_model

log = logging.getLogger(__name__)


class ChunkNotFoundError(LmdisaggError):
    """A chunk key asked for is not (or no longer) in this engine's cache."""

    status = 404
    type = "chunk_not_found"


@dataclass
class GenerationResult:
    """A finished request, as ``Engine.generate`` returns it."""

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    finish_reason: str | None
    ttft_s: float = 0.0  # add_request -> first token
    e2e_s: float = 0.0   # add_request -> finished
    logprobs: list | None = None  # per generated token, when params.logprobs is set (request.TokenLogprob)
    prompt_logprobs: list | None = None  # per prompt token (None for the first), with params.prompt_logprobs


@dataclass
class EngineStats:
    prompt_tokens: int = 0            # prompt tokens of admitted requests
    computed_prompt_tokens: int = 0   # of those, tokens actually run through the model
    cached_prompt_tokens: int = 0     # of those, tokens served from the prefix cache
    generated_tokens: int = 0
    steps: int = 0
    imported_chunks: int = 0
    exported_chunks: int = 0
    aborted: int = 0                  # requests aborted (client gone, error, timeout)
    extra: dict = field(default_factory=dict)


class Engine(EngineBase):
    def __init__(self, config: EngineConfig | None = None, *, kv_allocator=None, **overrides):
        """``kv_allocator(shape, dtype, device) -> Tensor`` lets a transport own the cache memory
        (e.g. POSIX shared memory); it must return a zeroed, contiguous tensor."""
        cfg = config or EngineConfig()
        if overrides:
            cfg = EngineConfig(**{**cfg.__dict__, **overrides})
        self.config = cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidRequestError("device 'cuda' asked for, but CUDA is not available on this machine")
        # requests' samplers draw on the logits' device: a generator made for "cuda" has no index
        # and is not the logits' "cuda:N" generator (draws would silently use the global one)
        self._gen_device = (torch.device("cuda", torch.cuda.current_device() if self.device.index is None
                                         else self.device.index) if self.device.type == "cuda" else self.device)
        dtype_name = cfg.resolved_dtype()
        self.dtype = torch_dtype(dtype_name)
        if cfg.chunk_tokens <= 0 or cfg.chunk_tokens & (cfg.chunk_tokens - 1):
            raise InvalidRequestError(f"chunk_tokens must be a power of two, got {cfg.chunk_tokens}")

        self.source = resolve_model(cfg.model)
        self.model_config = mc = self.source.config
        self.tokenizer = Tokenizer(self.source.path, mc) if self.source.path is not None else None
        self.eos_token_ids = (self.tokenizer.eos_token_ids if self.tokenizer else frozenset(mc.eos_token_ids))
        self.model = load_model(self.source, self.device, self.dtype, cfg.seed)
        self.fingerprint = fingerprint(self.source, cfg.seed)
        self.layout = KVLayout(mc.num_layers, mc.num_kv_heads, mc.head_dim, cfg.chunk_tokens, dtype_name)
        self.namespace = KeyNamespace(self.fingerprint, dtype_name, KVLayout.VERSION)

        self.max_model_len = cfg.max_model_len or min(mc.max_position_embeddings, 32768)
        num_blocks = cfg.num_blocks or self._default_num_blocks()
        min_blocks = -(-self.max_model_len // cfg.chunk_tokens)
        if num_blocks < min_blocks:
            raise InvalidRequestError(
                f"{num_blocks} KV blocks of {cfg.chunk_tokens} tokens cannot hold one max_model_len="
                f"{self.max_model_len} request (needs {min_blocks}); raise num_blocks/kv_cache_bytes "
                f"or lower max_model_len")
        self.blocks = BlockManager(num_blocks, cfg.chunk_tokens)
        self.runner = ModelRunner(self.model, num_blocks, cfg.chunk_tokens, self.dtype, self.device,
                                  kv_allocator, max_num_seqs=cfg.max_num_seqs,
                                  max_model_len=self.max_model_len, cuda_graphs=cfg.cuda_graphs)
        batched = cfg.max_num_batched_tokens or max(self.max_model_len, 8192)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, batched, self._seq_keys)
        self.seqs: dict[str, Sequence] = {}
        self.held: dict[str, Sequence] = {}  # prefill_only requests done, blocks kept for export
        self.stats = EngineStats()
        self._arrival: dict[str, float] = {}
        self._max_stop_len = 0
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()

    def _default_num_blocks(self) -> int:
        budget = self.config.kv_cache_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.85)
            else:
                budget = 2 << 30
        return max(1, budget // self.layout.chunk_nbytes)

    # --- keys ---------------------------------------------------------------------------------
    def chunk_keys(self, token_ids: list[int], salt: str | None = None) -> list[ChunkKey]:
        """Keys of the full chunks of ``token_ids`` (a request's ``cache_salt`` starts another chain)."""
        return chunk_keys(token_ids, self.config.chunk_tokens, self.namespace, salt_root(salt))

    def _seq_keys(self, seq: Sequence) -> list[ChunkKey]:
        """Keys of every full chunk of ``seq.token_ids``, extended incrementally."""
        t = self.config.chunk_tokens
        have = len(seq.chunk_keys)
        full = len(seq) // t
        if full > have:
            parent = seq.chunk_keys[-1] if have else salt_root(seq.params.cache_salt)
            seq.chunk_keys += chunk_keys(seq.token_ids[have * t:full * t], t, self.namespace, parent)
        return seq.chunk_keys[:full]

    # --- tokenization ---------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequestError(f"model {self.config.model!r} has no tokenizer; pass token ids")
        return self.tokenizer

    def encode(self, prompt: str) -> list[int]:
        return self._need_tokenizer().encode(prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self._need_tokenizer().apply_chat_template(messages)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer else ""

    # --- requests -----------------------------------------------------------------------------
    def validate(self, prompt_token_ids, params: SamplingParams) -> None:
        """Raise a typed error for anything that cannot run; nothing is changed."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams")
        params.validate()
        if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        # exactly int (no bools, floats or strings), checked in C: ~0.4 ms for 8K tokens, not ~1 ms
        if set(map(type, prompt_token_ids)) != {int} or min(prompt_token_ids) < 0 \
                or max(prompt_token_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if any(tok >= vocab for tok, _ in params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        if any(tok >= vocab for tok in params.allowed_token_ids):
            raise InvalidRequestError(f"allowed_token_ids must be in [0, {vocab})", param="allowed_token_ids")
        if params.structured is not None:
            self.grammars().compile(params.structured)  # 400 for a constraint that does not compile
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise ContextLengthError(
                f"prompt has {n} tokens; this model's context is {self.max_model_len} tokens", param="prompt")
        if n + params.max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens", param="max_tokens")
        need = -(-(n + params.max_tokens) // self.config.chunk_tokens)
        if need > self.blocks.num_blocks:
            raise OutOfBlocksError(f"request needs {need} KV blocks; the pool has {self.blocks.num_blocks}")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    prefill_only: bool = False, resumed: list[int] = (), num_text_emitted: int = 0) -> None:
        """Queue a request. With ``prefill_only`` it stops after its first token (unless that token
        already finishes it) and its blocks stay held for export until ``release_held(id)``; its
        output then has ``finished=True, finish_reason=None, prefill_done=True``.

        ``resumed``: tokens this request already generated elsewhere (and streamed, with
        ``num_text_emitted`` characters of text), as when its worker died: they are computed with
        the prompt and count as output (max_tokens, usage, stop strings), and generation goes on."""
        if request_id in self.seqs or request_id in self.held:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        self.validate(prompt_token_ids, params)
        self._check_resumed(resumed, params)
        seq = self._sequence(request_id, prompt_token_ids, params)
        seq.token_ids += resumed
        seq.num_text_emitted = seq.stop_from = num_text_emitted  # that text was checked for stop strings
        seq.prefill_only = prefill_only
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            seq.generator = torch.Generator(device=self._gen_device).manual_seed(seed)
        self._max_stop_len = max([self._max_stop_len] + [len(s) for s in params.stop])
        self.seqs[request_id] = seq
        self._arrival[request_id] = time.perf_counter()
        self.scheduler.add(seq)

    def grammars(self) -> Grammars:
        """Structured outputs' compiler for this model's vocabulary (made on first use)."""
        with self._grammars_lock:  # workers compile in a thread as well as on the engine's
            if self._grammars is None:
                if self.tokenizer is None:
                    raise InvalidRequestError(f"model {self.config.model!r} has no tokenizer, which structured "
                                              f"outputs need", param="response_format")
                self._grammars = Grammars(self.tokenizer.hf, self.model_config.vocab_size, self.eos_token_ids)
            return self._grammars

    def _sequence(self, request_id: str, prompt_token_ids, params: SamplingParams) -> Sequence:
        seq = Sequence(request_id, list(prompt_token_ids), params)
        if params.structured is not None:  # fed the output tokens it has (resumed, handed off) at the first mask
            seq.grammar = self.grammars().state(params.structured)
        if params.min_tokens:
            ban = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
            seq.min_tokens_ban = tuple(sorted(ban))
        return seq

    @staticmethod
    def _check_resumed(resumed: list[int], params: SamplingParams) -> None:
        if len(resumed) >= params.max_tokens:
            raise InvalidRequestError(f"{len(resumed)} tokens already generated leave none of max_tokens="
                                      f"{params.max_tokens} to resume", param="max_tokens")

    def abort(self, request_id: str) -> bool:
        if self.release_held(request_id):
            return True
        seq = self.seqs.pop(request_id, None)
        self._arrival.pop(request_id, None)
        if seq is None:
            return False
        self.stats.aborted += 1
        self.scheduler.remove(seq)
        seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def num_unfinished(self) -> int:
        return len(self.seqs)

    # --- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        prefills, decodes = self.scheduler.schedule()
        if not prefills and not decodes:
            return []
        for seq in prefills:
            computed = len(seq) - seq.num_computed_tokens
            if len(seq.output_token_ids) == 0:  # not a preempted request coming back
                self.stats.prompt_tokens += seq.num_prompt_tokens
                self.stats.cached_prompt_tokens += seq.num_cached_tokens
            self.stats.computed_prompt_tokens += computed
        tokens, logprobs = self.runner.run(prefills, decodes)
        self.stats.steps += 1
        return [self._postprocess(seq, tok, lp) for seq, tok, lp in zip(prefills + decodes, tokens, logprobs)]

    def _postprocess(self, seq: Sequence, token: int, logprob=None) -> RequestOutput:
        seq.num_computed_tokens = len(seq)
        seq.token_ids.append(token)
        self.stats.generated_tokens += 1
        self._register_full_chunks(seq)
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            seq.finish_reason = "stop"
        elif len(seq.output_token_ids) >= p.max_tokens or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"
        delta = self._detokenize(seq)
        finished = seq.finish_reason is not None
        prefill_done = seq.prefill_only and not finished
        cached = min(seq.num_cached_tokens, seq.num_prompt_tokens)  # a resumed request's hits may go past it
        out = RequestOutput(seq.request_id, [token], delta, finished or prefill_done, seq.finish_reason,
                            seq.num_prompt_tokens, cached, len(seq.output_token_ids), prefill_done=prefill_done,
                            logprobs=None if logprob is None else [logprob], prompt_logprobs=seq.prompt_logprobs)
        seq.prompt_logprobs = None  # returned once
        if finished:
            self.scheduler.remove(seq)
        elif prefill_done:
            self.scheduler.detach(seq)  # keeps its blocks
            self.held[seq.request_id] = seq
        if finished or prefill_done:
            self.seqs.pop(seq.request_id, None)
            self._arrival.pop(seq.request_id, None)
        return out

    def _register_full_chunks(self, seq: Sequence) -> None:
        t = self.config.chunk_tokens
        full = seq.num_computed_tokens // t
        keys = self._seq_keys(seq)  # covers len(seq) // t >= full
        for i in range(seq.num_registered, full):
            self.blocks.register(seq.block_table[i], keys[i])
        seq.num_registered = max(seq.num_registered, full)

    def _detokenize(self, seq: Sequence) -> str:
        """New text since the last call; holds back a partial UTF-8 char and a possible stop prefix."""
        if self.tokenizer is None:
            return ""
        ids = seq.output_token_ids
        stop_ids = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else set(self.eos_token_ids))
        if seq.finish_reason == "stop" and ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, seq.params.skip_special_tokens)
        finished = seq.finish_reason is not None
        if len(seq.output_token_ids) > seq.params.min_tokens:  # (vLLM) none before min_tokens
            for s in seq.params.stop:
                i = text.find(s, max(0, seq.stop_from - len(s) + 1))  # ending past stop_from
                if i != -1:
                    text = text[:i]
                    seq.finish_reason = "stop"
                    finished = True
        else:
            seq.stop_from = len(text.removesuffix("\ufffd"))
        if not finished:
            if text.endswith("\ufffd"):
                text = text[:-1]
            hold = max((len(s) - 1 for s in seq.params.stop), default=0)
            if hold:
                text = text[:max(len(text) - hold, seq.num_text_emitted)]
        seq.text = text
        delta = text[seq.num_text_emitted:]
        seq.num_text_emitted = max(seq.num_text_emitted, len(text))
        return delta

    # --- KV chunk seam ------------------------------------------------------------------------
    def enable_kv_events(self, on: bool = True) -> None:
        self.blocks.record_events = on

    def drain_kv_events(self) -> list[tuple[str, ChunkKey]]:
        """("stored" | "evicted", key) for every chunk named or evicted since the last drain, in
        order. Recorded only after ``enable_kv_events()``."""
        events, self.blocks.events = self.blocks.events, []
        return events

    @property
    def kv_buffer(self) -> torch.Tensor:
        """The whole paged cache, ``[num_blocks, L, 2, T, H_kv, D]``; block b = chunk bytes at
        offset ``b * layout.chunk_nbytes``. Transports register this once."""
        return self.runner.kv

    def cached_prefix(self, keys: list[ChunkKey]) -> int:
        return self.blocks.lookup(keys)

    def _block(self, key: ChunkKey) -> int:
        bid = self.blocks.block_of(key)
        if bid is None:
            raise ChunkNotFoundError(f"chunk {key.hex()} is not cached on this engine")
        return bid

    def export_chunks(self, keys: list[ChunkKey]) -> list[torch.Tensor]:
        out = [self.runner.kv[self._block(k)] for k in keys]  # views: [L, 2, T, H_kv, D]
        self.stats.exported_chunks += len(out)
        return out

    def pin_chunks(self, keys: list[ChunkKey]) -> list[int]:
        """Hold the blocks of ``keys`` (no eviction) until ``unpin_chunks``; returns block ids."""
        ids = [self._block(k) for k in keys]
        for b in ids:
            self.blocks.acquire(b)
        return ids

    def unpin_chunks(self, block_ids: list[int]) -> None:
        for b in block_ids:
            self.blocks.release(b)

    def reserve_chunks(self, keys: list[ChunkKey]) -> dict[ChunkKey, int]:
        """Fresh blocks (held) for the keys not cached yet, to be filled by a transport."""
        out: dict[ChunkKey, int] = {}
        for k in keys:
            if k in out or self.blocks.block_of(k) is not None:
                continue
            if not self.blocks.num_free:
                self.release_reserved(out)
                raise OutOfBlocksError(f"no free KV blocks to import {len(keys)} chunks")
            out[k] = self.blocks.allocate()
        return out

    def commit_chunks(self, reserved: dict[ChunkKey, int], *, hold: bool = False) -> None:
        """The reserved blocks now hold their chunks: name them, and (unless ``hold``) let them go
        to the cache."""
        for k, b in reserved.items():
            self.blocks.register(b, k)
            if not hold:
                self.blocks.release(b)
        self.stats.imported_chunks += len(reserved)

    def release_reserved(self, reserved: dict[ChunkKey, int]) -> None:
        for b in reserved.values():
            self.blocks.release(b)

    def held_request(self, request_id: str) -> Sequence:
        """A prefill_only request that finished its prefill; its ``block_table`` covers the prompt
        (full chunks first, then the partial tail block if the prompt is not chunk-aligned)."""
        seq = self.held.get(request_id)
        if seq is None:
            raise ChunkNotFoundError(f"request {request_id!r} holds no prefilled KV here")
        return seq

    def release_held(self, request_id: str) -> bool:
        seq = self.held.pop(request_id, None)
        if seq is None:
            return False
        self.blocks.free_table(seq.block_table)
        seq.status = Status.FINISHED
        return True

    def allocate_blocks(self, n: int) -> list[int]:
        """``n`` anonymous blocks, held (e.g. a prompt's partial tail block to receive)."""
        if self.blocks.num_free < n:
            raise OutOfBlocksError(f"need {n} free KV blocks, {self.blocks.num_free} free")
        return [self.blocks.allocate() for _ in range(n)]

    def free_blocks(self, block_ids: list[int]) -> None:
        for b in block_ids:
            self.blocks.release(b)

    def claim_chunks(self, keys: list[ChunkKey]) -> tuple[list[int], dict[ChunkKey, int]]:
        """Hold a block for every key, in order: the cached block where there is one, else a
        fresh block. Returns (block_ids, to_fill): the fresh blocks a transport must fill before
        ``commit_chunks(to_fill, hold=True)``. On any failure call ``free_blocks(block_ids)``."""
        ids: list[int] = []
        to_fill: dict[ChunkKey, int] = {}
        try:
            for k in keys:
                bid = self.blocks.block_of(k)
                if bid is not None:
                    self.blocks.acquire(bid)
                elif k in to_fill:
                    bid = to_fill[k]
                    self.blocks.acquire(bid)
                else:
                    if not self.blocks.num_free:
                        raise OutOfBlocksError(f"no free KV blocks to receive {len(keys)} chunks")
                    bid = to_fill[k] = self.blocks.allocate()
                ids.append(bid)
        except OutOfBlocksError:
            self.free_blocks(ids)
            raise
        return ids, to_fill

    def add_prefilled_request(self, request_id: str, prompt_token_ids: list[int], first_token: int,
                              params: SamplingParams, block_ids: list[int] | None, *, num_text_emitted: int = 0,
                              generator_state: torch.Tensor | None = None, resumed: list[int] = ()) -> None:
        """Continue a request prefilled elsewhere: ``first_token`` was sampled by the prefill side
        and already streamed, with ``num_text_emitted`` characters of text. ``resumed``: tokens
        generated before the prefill (see ``add_request``); the KV covers prompt + resumed.

        ``block_ids`` hold that KV (held by the caller; ownership passes to the engine) and the
        request goes straight to decode. With ``block_ids=None`` (the transfer failed) the engine
        computes prompt + resumed + first token itself, using its prefix cache."""
        t = self.config.chunk_tokens
        if request_id in self.seqs or request_id in self.held:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        context = len(prompt_token_ids) + len(resumed)
        if block_ids is not None and len(block_ids) != -(-context // t):
            raise InvalidRequestError(f"{len(block_ids)} blocks do not cover a {context}-token context")
        self.validate(prompt_token_ids, params)
        self._check_resumed(resumed, params)
        seq = self._sequence(request_id, prompt_token_ids, params)
        seq.token_ids += resumed
        seq.token_ids.append(first_token)
        seq.num_text_emitted = seq.stop_from = num_text_emitted
        if params.temperature > 0:
            seq.generator = gen = torch.Generator(device=self._gen_device)  # draws on the logits' device
            seed = params.seed if params.seed is not None else self.config.seed
            if generator_state is None:
                gen.manual_seed(seed)
            else:
                try:
                    gen.set_state(generator_state)
                except (RuntimeError, ValueError) as e:  # the state of another device type's generator
                    log.warning("request %s: the prefill side's sampler state does not fit this %s generator "
                                "(%s); reseeded, so its samples are not those one engine would draw", request_id,
                                self.device.type, e)
                    gen.manual_seed(seed)
        self.seqs[request_id] = seq
        self._arrival[request_id] = time.perf_counter()
        if block_ids is None:
            self.scheduler.add(seq)
            return
        seq.block_table = list(block_ids)
        seq.num_computed_tokens, seq.num_cached_tokens = context, len(prompt_token_ids)
        seq.num_registered = context // t
        self.scheduler.add_running(seq)

    def import_chunks(self, keys: list[ChunkKey], payloads: list[torch.Tensor]) -> int:
        if len(keys) != len(payloads):
            raise InvalidRequestError("import_chunks: keys and payloads differ in length")
        shape = self.layout.chunk_shape
        for p in payloads:
            if tuple(p.shape) != shape or p.dtype != self.dtype:
                raise InvalidRequestError(f"chunk payload {tuple(p.shape)} {p.dtype} does not match the "
                                          f"layout {shape} {self.dtype}")
        reserved = self.reserve_chunks(keys)
        with torch.inference_mode():
            for k, p in zip(keys, payloads):
                if k in reserved:
                    self.runner.kv[reserved[k]].copy_(p, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.commit_chunks(reserved)
        return len(reserved)

    # --- convenience: the offline Python API -----------------------------------------------------
    def generate(self, prompts, params: SamplingParams | None = None, *, chat: bool = False) -> list[GenerationResult]:
        """Run prompts to completion. Each prompt is text, token ids, or (with chat) a message list."""
        params = params or SamplingParams()
        single = isinstance(prompts, str) or not prompts or isinstance(prompts[0], int)
        batch = [prompts] if single else list(prompts)
        ids = []
        for p in batch:
            if chat:
                ids.append(self.encode_chat(p if isinstance(p, list) else [{"role": "user", "content": p}]))
            else:
                ids.append(self.encode(p) if isinstance(p, str) else list(p))
        rids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(batch))]
        for rid, toks in zip(rids, ids):
            self.add_request(rid, toks, params)
        t0 = time.perf_counter()
        results = {rid: GenerationResult(rid, "", [], len(t), 0, None) for rid, t in zip(rids, ids)}
        while any(r.finish_reason is None for r in results.values()):
            for out in self.step():
                r = results.get(out.request_id)
                if r is None:
                    continue
                if not r.token_ids:
                    r.ttft_s = time.perf_counter() - t0
                r.token_ids += out.new_token_ids
                r.text += out.text_delta
                if out.logprobs is not None:
                    r.logprobs = (r.logprobs or []) + out.logprobs
                if out.prompt_logprobs is not None:
                    r.prompt_logprobs = out.prompt_logprobs
                r.cached_tokens = out.cached_tokens
                if out.finished:
                    r.finish_reason = out.finish_reason
                    r.e2e_s = time.perf_counter() - t0
        return [results[rid] for rid in rids]
