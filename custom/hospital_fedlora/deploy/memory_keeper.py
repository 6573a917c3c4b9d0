"""A kit component for FLARE's long-lived parent processes: releases freed memory every few minutes.

``make kits`` adds it to every kit's ``local/resources.json``. The job processes release memory once a
round themselves (the executor; ScatterAndGather's ``memory_gc_rounds`` on the server); the parent
process, which relays every message of every job, gets this.
"""

from __future__ import annotations

import threading

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext

from ..memory import release_memory


class MemoryKeeper(FLComponent):
    """Calls ``memory.release_memory`` every ``interval_s`` seconds from system start to system end.

    Args:
        interval_s: seconds between releases (a full collection of a 200 MB process takes well under 0.1 s).
    """

    def __init__(self, interval_s: float = 120.0):
        super().__init__()
        if interval_s <= 0:
            raise ValueError(f"MemoryKeeper: interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.SYSTEM_START and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="memory_keeper", daemon=True)
            self._thread.start()
        elif event_type == EventType.SYSTEM_END:
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            release_memory()
