"""Token sampling: greedy, or temperature + min_p / top_k / top_p with a per-request seeded
generator; logit_bias, the repetition / frequency / presence penalties and a structured output's
grammar mask first (as vLLM)."""
from __future__ import annotations

import torch

from lmdisagg.engine.request import Sequence, TokenLogprob
from lmdisagg.engine.structured import apply_masks


def to_host(t: torch.Tensor, pinned: torch.Tensor | None = None) -> list:
    """A small 1-D tensor's values as a list, once the work queued before it on the current
    stream is done. A CUDA tensor goes through pinned memory (``pinned``, a buffer of the caller
    that holds enough values, reused each step) and an event wait, not ``.tolist()``, which keeps
    the GIL while it waits for the step's kernels: every other thread of the worker (its event
    loop, a KV pull) then stood still for the rest of the step (a pull's launch waited ~4 ms per
    decode step on H200)."""
    if t.device.type != "cuda":
        return t.tolist()
    n = t.numel()
    if pinned is None or pinned.numel() < n or pinned.dtype != t.dtype:
        pinned = torch.empty(n, dtype=t.dtype, pin_memory=True)
    host = pinned[:n]
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    done.synchronize()  # releases the GIL
    return host.tolist()


def sample(logits: torch.Tensor, seqs: list[Sequence],
           pinned: torch.Tensor | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [B, vocab] fp32, row i belongs to seqs[i]; pinned: see to_host. -> each sequence's
    next token, and its log-probabilities where its request asked for them (else None)."""
    tokens = _sample(logits, seqs, pinned)
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(seqs)
    if want:
        for i, lp in zip(want, token_logprobs(logits, want, [tokens[i] for i in want],
                                              [seqs[i].params.logprobs for i in want])):
            out[i] = lp
    return tokens, out


def token_logprobs(logits: torch.Tensor, rows: list[int], chosen: list[int], top: list[int]) -> list[TokenLogprob]:
    """log_softmax of the raw logits of ``rows``: the ``chosen`` token's value and the ``top[j]``
    largest (token, value) pairs of row j, largest first (what vLLM returns by default)."""
    dev = logits.device
    lsm = torch.log_softmax(logits.index_select(0, torch.tensor(rows, device=dev)).float(), dim=-1)  # [R, vocab]
    picked = lsm.gather(1, torch.tensor(chosen, device=dev).view(-1, 1)).view(-1).tolist()
    k = max(top)
    best_lp, best_id = lsm.topk(k, dim=-1) if k else (lsm[:, :0], lsm[:, :0].long())
    best_lp, best_id = best_lp.tolist(), best_id.tolist()
    return [(picked[j], tuple(zip(best_id[j][:top[j]], best_lp[j][:top[j]]))) for j in range(len(rows))]


def _sample(logits: torch.Tensor, seqs: list[Sequence], pinned: torch.Tensor | None) -> list[int]:
    if any(s.params.processes_logits for s in seqs):  # a copy: logprobs are the raw logits'
        logits = logits.clone()
        for i, seq in enumerate(seqs):
            if seq.params.processes_logits:
                process_logits(logits[i], seq)
        constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if constrained:  # structured outputs: their grammars' masks, last (-inf stays -inf)
            apply_masks(logits, constrained, [seqs[i].grammar for i in constrained],
                        [seqs[i].output_token_ids for i in constrained])
    rows = [i for i, s in enumerate(seqs) if s.params.temperature > 0.0]
    if len(rows) == len(seqs):  # every row sampled: no argmax, no scatter
        return to_host(_draw(logits, rows, seqs), pinned)
    chosen = logits.argmax(dim=-1)
    if rows:
        chosen[_on(logits.device, rows, torch.long)] = _draw(logits, rows, seqs)
    return to_host(chosen, pinned)  # one wait for the whole batch


def _on(dev: torch.device, vals: list, dtype: torch.dtype) -> torch.Tensor:
    """A short host list as a tensor on ``dev``, without a host wait: through pinned memory and a
    non-blocking copy on CUDA (a pageable copy waits for the step's forward to finish, and every
    sampling kernel after it is then launched onto an idle GPU)."""
    t = torch.tensor(vals, dtype=dtype)
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t


def _col(dev: torch.device, vals: list):
    """A per-row value for a product or a comparison: a Python number when every row has the same
    (one request, or one setting; the same bits as a column), else a [R, 1] column on ``dev``."""
    return vals[0] if all(v == vals[0] for v in vals) else _on(dev, vals, torch.float32).view(-1, 1)


_NUCLEUS_K = 256  # CPU top_p: the candidates taken before falling back to a full sort


def _draw(logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> torch.Tensor:
    """One sampled token per row of ``rows``, on the logits' device, batched: temperature, then
    min_p, top_k (renormalized), top_p, then the exponential race ``argmax(p / E)`` with E ~ Exp(1)
    drawn from each sequence's own generator, which picks token t with probability p_t (as
    ``multinomial`` would) without a host round trip per row."""
    dev = logits.device
    ps = [seqs[i].params for i in rows]
    sub = logits if len(rows) == logits.shape[0] else logits[_on(dev, rows, torch.long)]
    # always a column: a division by a Python number is a multiplication by its reciprocal in
    # PyTorch, whose last bit may differ, and a row's draw must not depend on its batch
    temps = _on(dev, [p.temperature for p in ps], torch.float32).view(-1, 1)
    probs = torch.softmax(sub.float() / temps, dim=-1)
    min_ps = [p.min_p for p in ps]
    if any(m > 0.0 for m in min_ps):  # keeps each row's top token
        probs = probs * (probs >= _col(dev, min_ps) * probs.amax(-1, keepdim=True))
    ks = [p.top_k if 0 < p.top_k < probs.shape[-1] else 0 for p in ps]
    if any(ks):
        kth = probs.topk(max(ks), dim=-1).values  # each row's k-th largest (rows without top_k: kept whole)
        if all(k == ks[0] for k in ks):
            probs = probs * (probs >= kth[:, ks[0] - 1:ks[0]])
        else:
            kth = kth.gather(1, _on(dev, [max(k, 1) - 1 for k in ks], torch.long).view(-1, 1))
            probs = probs * ((probs >= kth) | (_on(dev, ks, torch.long).view(-1, 1) == 0))
    if any(m > 0.0 for m in min_ps) or any(ks):
        probs = probs / probs.sum(-1, keepdim=True)
    top_ps = [p.top_p for p in ps]
    if any(t < 1.0 for t in top_ps):
        top = _col(dev, top_ps)
        sorted_p = None
        if dev.type == "cpu" and probs.shape[-1] > _NUCLEUS_K:
            # a CPU sorts a 49K vocabulary in ~1.8 ms a row; the nucleus is almost always within
            # the top few hundred tokens: take those, and sort whole only if some row's is not
            # (a GPU sorts fast, and this check would be a host wait there)
            sorted_p, idx = probs.topk(_NUCLEUS_K, dim=-1)
            cum = sorted_p.cumsum(-1)
            if not bool(((cum[:, -1:] >= top) | (top >= 1.0)).all()):
                sorted_p = None
        if sorted_p is None:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            cum = sorted_p.cumsum(-1)
        keep = cum - sorted_p < top  # the mass before a token is under top_p: always keeps the top token
        nucleus = torch.zeros_like(probs).scatter_(1, idx, sorted_p * keep)
        # (a uniform top_p is a number, < 1 here); rows without top_p keep every token (the top-k
        # path has dropped their tail)
        probs = torch.where(top < 1.0, nucleus, probs) if isinstance(top, torch.Tensor) else nucleus
    # Exp(1) noise as -log(U): PyTorch's CPU exponential_ draws ~6x slower than its uniform_
    # (0.93 against 0.14 ms for a 49K vocabulary), and a sampled step draws a row per sequence
    race = torch.empty_like(probs)
    for j, i in enumerate(rows):
        race[j].uniform_(generator=seqs[i].generator)  # the engine makes it on the logits' device
    # argmax p / E with E = -log U (U in [0, 1): E in (0, inf]) is argmin p / log U
    return (probs / race.log_()).argmin(dim=-1)


def process_logits(row: torch.Tensor, seq: Sequence) -> None:
    """In place on one sequence's logits [vocab]: allowed_token_ids' mask, logit_bias, then the
    repetition penalty (tokens of prompt + output, as HF transformers and vLLM), then the frequency
    and presence penalties (tokens of the output, as OpenAI), then min_tokens' ban on EOS and stop
    tokens. (A structured output's grammar mask comes after, for all constrained rows at once:
    ``apply_masks``.)"""
    p = seq.params
    dev = row.device
    if p.allowed_token_ids:  # only these may come: a mask made once, on the device
        if seq.allowed is None:
            seq.allowed = torch.full((row.numel(),), float("-inf"), dtype=row.dtype, device=dev)
            seq.allowed[torch.tensor(p.allowed_token_ids, device=dev)] = 0.0
        row.add_(seq.allowed)
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], device=dev)
        row.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype, device=dev))
    if p.repetition_penalty != 1.0:  # a mask of the context's tokens, kept on the device and extended
        if seq.seen is None:
            seq.seen = torch.zeros(row.numel(), dtype=torch.bool, device=dev)
        if seq.num_seen < len(seq.token_ids):
            seq.seen[torch.tensor(seq.token_ids[seq.num_seen:], device=dev)] = True
            seq.num_seen = len(seq.token_ids)
        row.copy_(torch.where(seq.seen, torch.where(row > 0, row / p.repetition_penalty,
                                                    row * p.repetition_penalty), row))
    out = seq.output_token_ids
    if out and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
        ids, counts = torch.tensor(out, device=dev).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
    if len(out) < p.min_tokens and seq.min_tokens_ban:  # EOS and stop tokens wait for min_tokens
        row[torch.tensor(seq.min_tokens_ban, device=dev)] = float("-inf")

