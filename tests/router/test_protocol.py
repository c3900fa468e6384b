"""Request fields the wire format turns into what the engine runs."""
from __future__ import annotations

import pytest


def test_truncate_prompt_tokens_keeps_the_last_tokens():
    """vLLM's truncate_prompt_tokens: k keeps the last k; -1 the last ``room`` (what the context
    leaves after max_tokens), so the request still fits; 0 is refused."""
    from lmdisagg.errors import InvalidRequestError
    from lmdisagg.router.protocol import CompletionRequest
    ids = list(range(100))
    cut = lambda k, room=1000: CompletionRequest(model="m", prompt="x", truncate_prompt_tokens=k).truncate(ids, room)  # noqa: E731
    assert cut(None) == ids and cut(5) == ids[-5:] and cut(500) == ids
    assert cut(-1, 40) == ids[-40:] and cut(-1, 1000) == ids
    with pytest.raises(InvalidRequestError, match="truncate_prompt_tokens"):
        cut(0)
