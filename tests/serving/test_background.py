"""Work the workers and the router start without awaiting it (workers/background.py)."""
from __future__ import annotations

import asyncio
import gc
import logging

from lmdisagg.workers.background import Background


def test_background_work_runs_to_its_end_and_its_failures_are_logged(caplog):
    """Tasks that nothing else references run to their end; a failure is logged under its name,
    not left for the garbage collector to report as "Task exception was never retrieved" (what
    a bare ``asyncio.ensure_future`` gives); what still runs at close is cancelled."""
    log = logging.getLogger("test.background")
    done = []
    unhandled = []

    async def step(i):
        for _ in range(3):
            await asyncio.sleep(0)
        done.append(i)

    async def fails():
        raise RuntimeError("the engine loop is stopped")

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unhandled.append(ctx["message"]))
        bg = Background(log)
        for i in range(20):
            bg.start(step(i), f"step {i}")
        bg.start(fails(), "abort of req-7")
        slow = bg.start(asyncio.sleep(60), "a slow drain")
        for _ in range(200):  # up to 10 s
            await asyncio.sleep(0.05)
            if len(bg) == 1:
                break
        assert len(bg) == 1  # only the slow one is left
        await bg.close(0.1)
        assert slow.cancelled() and len(bg) == 0
        gc.collect()

    with caplog.at_level(logging.WARNING, logger="test.background"):
        asyncio.run(main())
    assert sorted(done) == list(range(20))
    assert [r.getMessage() for r in caplog.records] == ["abort of req-7 failed: RuntimeError: the engine loop is stopped"]
    assert unhandled == []
