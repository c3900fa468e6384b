"""Prefill on one engine, decode on another: the engine-level handoff the workers build on."""
from __future__ import annotations

import pytest

from lmdisagg.engine import Engine, SamplingParams
from tests.engine.test_prefix_cache import long_prompt


@pytest.fixture(scope="module")
def decode_engine():
    return Engine(model="smollm2-135m", kv_cache_bytes=1 << 29)


def handoff(src: Engine, dst: Engine, rid: str, prompt: list[int], params: SamplingParams):
    src.add_request(rid, prompt, params, prefill_only=True)
    outs = []
    while src.has_unfinished():
        outs += src.step()
    (first,) = outs
    assert first.prefill_done and first.finished and first.finish_reason is None
    held = src.held_request(rid)
    keys = src.chunk_keys(prompt)
    tail = len(prompt) % src.config.chunk_tokens != 0
    assert len(held.block_table) == len(keys) + tail
    # destination: claim blocks (cached ones reused), copy the missing ones and the tail in
    block_ids, to_fill = dst.claim_chunks(keys)
    if tail:
        block_ids += dst.allocate_blocks(1)
        dst.kv_buffer[block_ids[-1]].copy_(src.kv_buffer[held.block_table[-1]])
    for k, b in to_fill.items():
        dst.kv_buffer[b].copy_(src.export_chunks([k])[0])
    dst.commit_chunks(to_fill, hold=True)
    gen_state = held.generator.get_state() if held.generator is not None else None
    dst.add_prefilled_request(rid, prompt, first.new_token_ids[0], params, block_ids,
                              num_text_emitted=len(first.text_delta), generator_state=gen_state)
    assert src.release_held(rid)
    tokens, text = list(first.new_token_ids), first.text_delta
    while dst.has_unfinished():
        for o in dst.step():
            tokens += o.new_token_ids
            text += o.text_delta
    return tokens, text, len(to_fill)


@pytest.mark.parametrize("n_tokens,temperature", [(50, 0.0), (256, 0.8), (700, 0.0)])
def test_prefill_here_decode_there_equals_one_engine(engine, decode_engine, n_tokens, temperature):
    prompt = long_prompt(engine, n_tokens, seed=n_tokens)
    params = SamplingParams(max_tokens=20, temperature=temperature, seed=7, ignore_eos=True)
    ref = engine.generate(prompt, params)[0]
    tokens, text, moved = handoff(engine, decode_engine, f"h-{n_tokens}-{temperature}", prompt, params)
    assert tokens == ref.token_ids
    assert text == ref.text
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert decode_engine.blocks.num_free == decode_engine.blocks.num_blocks


def test_second_handoff_moves_only_missing_chunks(engine, decode_engine):
    t = engine.config.chunk_tokens
    prefix = long_prompt(engine, 2 * t, seed=77)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    _, _, moved1 = handoff(engine, decode_engine, "m1", prefix + engine.encode(" one two"), params)
    _, _, moved2 = handoff(engine, decode_engine, "m2", prefix + engine.encode(" three four"), params)
    assert moved1 == 2 and moved2 == 0


def test_first_token_finishing_request_is_not_held(engine):
    engine.add_request("fin", engine.encode("Hello"), SamplingParams(max_tokens=1), prefill_only=True)
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "length" and not out.prefill_done
    assert not engine.release_held("fin")
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_failed_transfer_recompute_path_equals_one_engine(engine, decode_engine, temperature):
    prompt = long_prompt(engine, 300, seed=99)
    params = SamplingParams(max_tokens=12, temperature=temperature, seed=3, ignore_eos=True)
    ref = engine.generate(prompt, params)[0]
    engine.add_request("rc", prompt, params, prefill_only=True)
    (first,) = engine.step()
    held = engine.held_request("rc")
    state = held.generator.get_state() if held.generator is not None else None
    engine.release_held("rc")
    decode_engine.add_prefilled_request("rc", prompt, first.new_token_ids[0], params, None,
                                        num_text_emitted=len(first.text_delta), generator_state=state)
    tokens, text = list(first.new_token_ids), first.text_delta
    while decode_engine.has_unfinished():
        for o in decode_engine.step():
            tokens += o.new_token_ids
            text += o.text_delta
    assert tokens == ref.token_ids and text == ref.text


def run_steps(e: Engine, rid: str, prompt: list[int], params: SamplingParams, **kw) -> list:
    e.add_request(rid, prompt, params, **kw)
    outs = []
    while e.has_unfinished():
        outs += [o for o in e.step() if o.request_id == rid]
    return outs


@pytest.mark.parametrize("where", ["one engine", "handoff"])
def test_resumed_request_goes_on_as_if_never_stopped(engine, decode_engine, where):
    """A request whose worker died is resumed elsewhere with the tokens it had streamed: the rest
    of its tokens, text and usage are those of the uninterrupted run (the router's migration)."""
    t = engine.config.chunk_tokens
    prompt = long_prompt(engine, t - 10, seed=5)  # prompt + resumed tokens cross a chunk boundary
    prompt += engine.encode(" Then the wizard said that")
    params = SamplingParams(max_tokens=40, ignore_eos=True, stop=("zzz never",))  # a held-back stop prefix too
    ref = run_steps(engine, f"ref-{where}", prompt, params)
    assert len(ref) == 40
    k = 25
    before = ref[:k]
    resumed = [o.new_token_ids[0] for o in before]
    emitted = "".join(o.text_delta for o in before)
    if where == "one engine":
        rest = run_steps(decode_engine, "resumed-1", prompt, params, resumed=resumed, num_text_emitted=len(emitted))
    else:  # prefill (prompt + resumed) on one engine, decode on the other
        rid = "resumed-2"
        engine.add_request(rid, prompt, params, prefill_only=True, resumed=resumed, num_text_emitted=len(emitted))
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        (first,) = outs
        context = prompt + resumed
        held = engine.held_request(rid)
        assert len(held.block_table) == -(-len(context) // t)
        block_ids = decode_engine.allocate_blocks(len(held.block_table))
        for s, d in zip(held.block_table, block_ids):
            decode_engine.kv_buffer[d].copy_(engine.kv_buffer[s])
        decode_engine.add_prefilled_request(rid, prompt, first.new_token_ids[0], params, block_ids,
                                            num_text_emitted=held.num_text_emitted, resumed=resumed)
        assert engine.release_held(rid)
        rest = [first]
        while decode_engine.has_unfinished():
            rest += decode_engine.step()
    assert [o.new_token_ids[0] for o in rest] == [o.new_token_ids[0] for o in ref[k:]]
    assert emitted + "".join(o.text_delta for o in rest) == "".join(o.text_delta for o in ref)
    assert [(o.prompt_tokens, o.completion_tokens) for o in rest] == [(o.prompt_tokens, o.completion_tokens)
                                                                      for o in ref[k:]]
    assert rest[-1].finished and rest[-1].finish_reason == "length"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert decode_engine.blocks.num_free == decode_engine.blocks.num_blocks


def test_resumed_request_needs_tokens_left(engine):
    from lmdisagg.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request("r-full", [1, 2, 3], SamplingParams(max_tokens=2), resumed=[5, 6])
    assert "r-full" not in engine.seqs
