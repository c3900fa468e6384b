"""The sampler's draws: batched on the logits' device (the exponential race), they must follow
the distribution that temperature, min_p, top_k and top_p leave, computed here independently."""
from __future__ import annotations

import pytest
import torch

from lmdisagg.engine.request import SamplingParams, Sequence
from lmdisagg.engine.sampler import _draw

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def expected(params: SamplingParams) -> torch.Tensor:
    p = torch.softmax(LOGITS / params.temperature, -1)
    order = p.argsort(descending=True).tolist()
    keep = set(order)
    if params.min_p:
        keep &= {t for t in order if p[t] >= params.min_p * p.max()}
    if params.top_k:
        keep &= set(order[:params.top_k])
    q = torch.tensor([p[t] if t in keep else 0.0 for t in range(len(p))])
    q = q / q.sum()
    if params.top_p < 1.0:  # the smallest most-likely prefix whose mass reaches top_p
        kept, mass = set(), 0.0
        for t in sorted(range(len(q)), key=lambda t: -q[t]):
            if mass >= params.top_p:
                break
            kept.add(t)
            mass += float(q[t])
        q = torch.tensor([q[t] if t in kept else 0.0 for t in range(len(q))])
        q = q / q.sum()
    return q


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.3, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.9, min_p=0.05),
], ids=["t1", "t0.5", "top_k", "top_p", "min_p", "all"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_draws_follow_the_truncated_distribution(params, device):
    n = 6000
    gen = torch.Generator(device).manual_seed(1)
    seqs = [Sequence("s", [1], params, generator=gen)] * n
    # a batch that also holds rows of other requests (other settings) in between
    other = Sequence("o", [1], SamplingParams(temperature=2.0, top_k=2), generator=torch.Generator(device).manual_seed(2))
    logits = LOGITS.repeat(2 * n, 1).to(device)
    rows = list(range(0, 2 * n, 2))
    batch = [seqs[0] if i % 2 == 0 else other for i in range(2 * n)]
    drawn = _draw(logits, rows + [1], batch)[:n]
    freq = torch.bincount(drawn.cpu(), minlength=len(LOGITS)).float() / n
    want = expected(params)
    assert freq[want == 0].sum() == 0, "a token outside the kept set was drawn"
    assert (freq - want).abs().max() < 0.025, (freq, want)


def test_same_generator_state_same_draws():
    params = SamplingParams(temperature=1.0)
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    logits = LOGITS.repeat(64, 1)
    x = _draw(logits, list(range(64)), [Sequence("a", [1], params, generator=a)] * 64)
    y = _draw(logits, list(range(64)), [Sequence("b", [1], params, generator=b)] * 64)
    assert torch.equal(x, y) and len(set(x.tolist())) > 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_allowed_token_ids_sample_from_those_only(device):
    """vLLM's allowed_token_ids: a sampled row draws from the softmax over those tokens alone (the
    mask is made once per request, on the logits' device); a greedy row takes their argmax."""
    from lmdisagg.engine.sampler import _sample
    n, allowed = 4000, (1, 3, 4, 6)
    params = SamplingParams(temperature=1.0, allowed_token_ids=allowed)
    seq = Sequence("s", [1], params, generator=torch.Generator(device).manual_seed(3))
    greedy = Sequence("g", [1], SamplingParams(allowed_token_ids=(2, 5)))
    drawn = _sample(LOGITS.repeat(n + 1, 1).to(device), [seq] * n + [greedy], None)
    assert drawn[-1] == 2
    freq = torch.bincount(torch.tensor(drawn[:n]), minlength=len(LOGITS)).float() / n
    want = torch.zeros(len(LOGITS))
    want[list(allowed)] = torch.softmax(LOGITS[list(allowed)], -1)
    assert freq[want == 0].sum() == 0 and (freq - want).abs().max() < 0.03, (freq, want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_rows_draw_does_not_depend_on_its_batch(device):
    """A seeded request samples the same tokens alone or batched with requests of other settings
    (a server batches whatever is running; one engine's answer must not change with it)."""
    from lmdisagg.engine.sampler import _sample
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)).to(device)
    mine = SamplingParams(temperature=0.7, top_p=0.9, min_p=0.02, top_k=40)
    others = [SamplingParams(temperature=1.3), SamplingParams(), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=0.2, top_p=0.5)]

    def run(batch: bool) -> list[int]:
        out = []
        gen = torch.Generator(device).manual_seed(11)
        for _ in range(50):
            seq = Sequence("me", [1], mine, generator=gen)
            if batch:
                rest = [Sequence(f"o{i}", [1], p, generator=torch.Generator(device).manual_seed(i))
                        for i, p in enumerate(others)]
                out.append(_sample(logits, [rest[0], seq] + rest[1:], None)[1])
            else:
                out.append(_sample(logits[1:2], [seq], None)[0])
        return out
    alone = run(False)
    assert alone == run(True) and len(set(alone)) > 3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_top_p_over_a_large_vocabulary(device):
    """top_p on a vocabulary larger than the candidates a CPU takes before sorting (256): a peaked
    row's nucleus lies among them, a flat row's does not (then the whole row is sorted), and a
    row without top_p in the same batch still draws from its whole vocabulary."""
    from lmdisagg.engine.sampler import _NUCLEUS_K
    v, n = 2000, 6000
    peaked = torch.full((v,), -8.0)
    peaked[:40] = torch.linspace(3.0, 0.0, 40)  # its 0.9 nucleus: a few of the first 40
    flat = torch.zeros(v)                        # its 0.9 nucleus: 1800 tokens
    assert v > _NUCLEUS_K
    cases = [(peaked, SamplingParams(temperature=1.0, top_p=0.9)),
             (flat, SamplingParams(temperature=1.0, top_p=0.9)),
             (flat, SamplingParams(temperature=1.0))]
    logits = torch.stack([c[0] for c in cases]).repeat(n, 1).to(device)
    gens = [torch.Generator(device).manual_seed(s) for s in range(3)]
    seqs = [Sequence(f"s{j}", [1], p, generator=gens[j]) for j, (_, p) in enumerate(cases)] * n
    drawn = _draw(logits, list(range(3 * n)), seqs).view(n, 3).cpu()
    p = torch.softmax(peaked, -1)
    order = p.argsort(descending=True)
    kept = order[:int(((p[order].cumsum(0) - p[order]) < 0.9).sum())]
    assert set(drawn[:, 0].tolist()) <= set(kept.tolist())
    freq = torch.bincount(drawn[:, 0], minlength=v).float() / n
    want = torch.zeros(v)
    want[kept] = p[kept] / p[kept].sum()
    assert (freq - want).abs().max() < 0.03
    # flat: 1800 equally likely tokens (which ones is the sort's choice among ties; one more if
    # rounding leaves the mass before the 1801st under 0.9), never the rest: 6000 draws from 1800
    # show ~1736 of them, from all 2000 ~1900
    assert 1650 < len(set(drawn[:, 1].tolist())) <= 1801
    assert len(set(drawn[:, 2].tolist())) > 1801
