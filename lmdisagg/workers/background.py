"""Work started and not awaited: a timer's release of held blocks, an abort sent to the workers
when a client leaves, the drop of a push expectation.

asyncio keeps only a weak reference to a task, so one that nothing else references can be
collected before it has run to its end; and a failed one that nobody awaits ends as "Task
exception was never retrieved" on the console at some later garbage collection. ``Background``
keeps each task until it ends, logs how it failed, and cancels what is left at shutdown.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Coroutine


class Background:
    def __init__(self, log: logging.Logger):
        self._log = log
        self._tasks: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, coro: Coroutine, what: str) -> asyncio.Task:
        """Run ``coro`` on the running loop; ``what`` names it in the log if it fails."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, what))
        return task

    def _done(self, task: asyncio.Task, what: str) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:
            self._log.warning("%s failed: %s: %s", what, type(err).__name__, err)

    async def close(self, timeout: float) -> None:
        """Let the tasks still running finish for up to ``timeout`` seconds, then cancel them."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
