"""One job at a time on a background thread, whose exception surfaces on the thread that waits for it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class OneAtATime:
    """start() runs fn on a daemon thread after the previous job has finished; join() waits and re-raises.

    The checkpoint writer and the best-weights export use it: a write that fails must stop the run at the next
    save or at close, on the training thread, not die silently in its own."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, fn: Callable[..., Any], *args: Any) -> None:
        self.join()

        def run() -> None:
            try:
                fn(*args)
            except BaseException as e:  # re-raised by join()
                self._error = e

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Block until the job in flight is done; raise what it raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
