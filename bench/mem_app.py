"""The app the memory benchmark runs under the real ``queueable-consume`` (``mem_app:app``, cwd ``bench/``).

A no-op async listener that, every ``BENCH_MEM_INTERVAL`` messages, prints one JSON line with the worker
process's resident memory to stdout. The queue and exchange come from ``QUEUEABLE_QUEUE`` and
``QUEUEABLE_EXCHANGE``, the broker from ``QUEUEABLE_URL``.
"""

from __future__ import annotations

import json
import os
import sys

from _common import MEM_LISTENER, OrderMem

from queueable import App
from queueable._worker import current_rss_mb

app = App()
_interval = int(os.environ.get("BENCH_MEM_INTERVAL", "10000"))
_seen = 0


async def on_order(_event: OrderMem) -> None:
    global _seen  # noqa: PLW0603 - a module-level counter is the whole point of this probe
    _seen += 1
    if _seen % _interval == 0:
        sys.stdout.write(json.dumps({"messages": _seen, "rss_mb": current_rss_mb()}) + "\n")
        sys.stdout.flush()


app.add_listener(on_order, queue=True, id=MEM_LISTENER)
