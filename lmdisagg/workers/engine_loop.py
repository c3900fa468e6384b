"""The one thread that drives an engine.

An engine is single-threaded. A worker's async methods never touch it directly: they submit
commands (functions of the engine) that run between steps, and read per-request outputs from
asyncio queues fed by the loop::

    loop thread:  run queued commands → engine.step() → deliver outputs to their streams → hooks
    actor (asyncio):  await loop.call(fn) ; async for out in loop.stream(rid)

Outputs reach the asyncio side with ``call_soon_threadsafe``; nothing here blocks the event loop.
If a step raises, every running request gets the error and is aborted; the loop keeps going.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from typing import Callable

from lmdisagg.engine.llm_engine import Engine
from lmdisagg.engine.request import RequestOutput

log = logging.getLogger(__name__)


class _Stream:
    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()


class EngineLoop:
    def __init__(self, engine: Engine, after_step: Callable[[Engine], None] | None = None):
        self.engine = engine
        self.after_step = after_step  # runs in the loop thread after every step (KV events, ...)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmdisagg-engine-loop", daemon=True)
        self._thread.start()

    # --- asyncio side -------------------------------------------------------------------------
    def submit(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` in the loop thread between steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError("engine loop is stopped"))
            return fut
        self._cmds.put((fn, fut))
        return fut

    async def call(self, fn: Callable[[Engine], object]):
        return await asyncio.wrap_future(self.submit(fn))

    def open_stream(self, request_id: str) -> asyncio.Queue:
        """Outputs (RequestOutput, or an Exception) for ``request_id`` arrive on this queue. Open it
        before submitting the request so no output is missed."""
        s = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = s
        return s.queue

    def fail(self, request_id: str, err: BaseException) -> None:
        """Loop thread: hand ``err`` to the request's stream (e.g. refused after a store load)."""
        self._deliver(request_id, err)

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(None)
        self._thread.join(timeout)

    # --- loop thread --------------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        s = self._streams.get(request_id)
        if s is not None:
            try:
                s.loop.call_soon_threadsafe(s.queue.put_nowait, item)
            except RuntimeError:  # its event loop is closed: nobody is listening
                self._streams.pop(request_id, None)

    def _run_commands(self, block: bool) -> None:
        try:
            item = self._cmds.get(timeout=0.05) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            try:
                item = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            self._run_commands(block=not engine.has_unfinished())
            if not engine.has_unfinished():
                if self.after_step is not None:
                    self._safe_hook()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # noqa: BLE001 - a step failure must not kill the worker
                log.exception("engine step failed; aborting %d running requests", engine.num_unfinished())
                for rid in list(engine.seqs):
                    engine.abort(rid)
                    self._deliver(rid, e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
            if self.after_step is not None:
                self._safe_hook()
        # drain: fail pending commands so no caller waits forever
        while True:
            try:
                item = self._cmds.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(RuntimeError("engine loop stopped"))

    def _safe_hook(self) -> None:
        try:
            self.after_step(self.engine)
        except Exception:  # noqa: BLE001
            log.exception("after_step hook failed")
