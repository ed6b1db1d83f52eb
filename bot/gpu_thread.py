"""The one thread that runs the engine: loading, compiling, painting, in order.

A daemon thread, not a ThreadPoolExecutor's: at exit Python joins an executor's threads, so a
model load or a compile under way (neither can be interrupted) would hold a stopping bot for
minutes, past Docker's 10 s. A painting job stops at its next step when asked (its cancel flag);
the queue waits a few seconds for that, then lets the process go.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class GpuThread:
    def __init__(self, name: str = "gpu") -> None:
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` after the calls before it; its result or exception lands in the future."""
        future: Future[T] = Future()
        self._calls.put((future, fn))
        return future

    def shutdown(self) -> None:
        """Let the thread end once the calls already submitted are done (returns at once)."""
        self._calls.put(None)

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            future, fn = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to whoever awaits the call
                future.set_exception(exc)
