"""Worker logs an operator can read in a file: plain lines (no colours, no cursor codes) when
stderr is not a terminal, and a repeated message (kafka-python and aiokafka log `Unable connect to
node …` on every retry, thousands of lines in a short broker outage) written once per interval
with the count of the ones held back."""
from __future__ import annotations

import logging
import sys
import time

PLAIN = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
INTERVAL = 30.0


class OncePerInterval(logging.Filter):
    """Lets the first record of a kind (logger and message template) through, holds back the same
    kind for `interval` seconds and then lets the next one through with the count held back."""

    def __init__(self, interval: float = INTERVAL):
        super().__init__()
        self.interval = interval
        self.seen: dict[tuple[str, str], list[float]] = {}  # kind -> [first let through, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        entry = self.seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return False
        held = int(entry[1]) if entry is not None else 0
        self.seen[key] = [now, 0]
        if held:
            record.msg = f"{record.msg} [{held:,} more like this in the last {now - entry[0]:,.0f} s]"
        return True


def plain(interval: float = INTERVAL) -> None:
    """Applies both rules to every handler of the root logger (call again after a framework
    configured logging its own way)."""
    # kafka-python 3 warns whenever one of its tasks takes over 100 ms: on two busy cores, always
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        stream = getattr(handler, "stream", None)
        if not (stream is not None and hasattr(stream, "isatty") and stream.isatty()):
            handler.setFormatter(PLAIN)
        if not any(isinstance(f, OncePerInterval) for f in handler.filters):
            handler.addFilter(OncePerInterval(interval))
