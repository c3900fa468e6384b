"""Token sampling: greedy, or temperature + top-p with a per-request seeded generator."""
from __future__ import annotations

import torch

from lmdisagg.engine.request import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    # logits: [B, vocab] fp32, row i belongs to seqs[i]
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.temperature == 0.0:
            out.append(greedy[i])
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < p.top_p   # always keeps the top token
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        gen = seq.generator
        if gen is not None and gen.device != probs.device:
            probs = probs.to(gen.device)
        out.append(int(torch.multinomial(probs, 1, generator=gen).item()))
    return out
