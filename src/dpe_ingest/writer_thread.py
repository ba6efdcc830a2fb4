"""One background thread that runs one task at a time, for a caller that goes on working meanwhile.

The consumer hands it a batch to write (database, dead letters) while its own thread fetches and
decodes the next one.  There is never more than one task in flight: :meth:`WriterThread.submit`
refuses a second one, so the caller decides what to do while it waits (keep its Kafka group alive).
An exception raised by the task is re-raised in the caller by :meth:`WriterThread.collect`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


class WriterThread:
    def __init__(self, name: str = "dpe-writer"):
        self._cond = threading.Condition()
        self._task: Callable[[], Any] | None = None
        self._done: tuple[bool, Any] | None = None  # (ok, result or exception) of the last task
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """A task is submitted and its outcome not collected yet."""
        with self._cond:
            return self._task is not None or self._done is not None

    def submit(self, task: Callable[[], Any]) -> None:
        with self._cond:
            if self._task is not None or self._done is not None:
                raise RuntimeError("a task is already in flight")
            if self._closed:
                raise RuntimeError("the writer thread is closed")
            self._task = task
            self._cond.notify_all()

    def collect(self, timeout: float | None = 0.0) -> tuple[bool, Any]:
        """Wait up to ``timeout`` seconds for the task in flight: ``(True, result)`` once it is done
        (re-raising its exception), ``(False, None)`` if it is still running or nothing was submitted."""
        with self._cond:
            if self._done is None and self._task is not None and timeout != 0.0:
                self._cond.wait_for(lambda: self._done is not None, timeout)
            if self._done is None:
                return False, None
            ok, value = self._done
            self._done = None
        if not ok:
            raise value
        return True, value

    def close(self) -> None:
        """Stop taking tasks; a task still running finishes on its own (the thread is a daemon)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._task is not None or self._closed)
                if self._task is None:
                    return
                task = self._task
            try:
                outcome = (True, task())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome = (False, exc)
            with self._cond:
                self._task = None
                self._done = outcome
                self._cond.notify_all()
