"""One line per event, readable by people and machines.

Default format is logfmt (``ts=… level=info event=page department=69 page=3 rows=1500 …``), which
``grep``/``kubectl logs`` users can read and log shippers can parse; ``LOG_FORMAT=json`` emits one
JSON object per line instead.  Every line carries an ``event`` name and its fields; a ``msg`` field
gives the human sentence.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .config import LogSettings


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        v = f"{v:.1f}"
    s = str(v)
    if s == "" or any(c in s for c in ' ="\\\n\t'):
        return json.dumps(s, ensure_ascii=False)
    return s


def _ts(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class EventFormatter(logging.Formatter):
    def __init__(self, fmt: str = "logfmt"):
        super().__init__()
        self.kind = fmt

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": _ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "log"),
        }
        fields.update(getattr(record, "fields", {}) or {})
        fields["msg"] = record.getMessage()
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info).splitlines()[-1]
        if self.kind == "json":
            return json.dumps(fields, ensure_ascii=False, default=str)
        return " ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items() if v is not None)


def setup(level: str | None = None, fmt: str | None = None) -> None:
    """Configure the root logger once for a command (stderr, one line per event): LOG_FORMAT, LOG_LEVEL
    and KAFKA_CLIENT_LOG_LEVEL (:class:`dpe_ingest.config.LogSettings`) unless given here."""
    settings = LogSettings.from_env()
    fmt = (fmt or settings.format).lower()
    if fmt not in ("logfmt", "json"):
        fmt = "logfmt"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EventFormatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or settings.level).upper())
    # kafka-python's own warnings and errors (a broker gone, a coordinator lost) are what an operator
    # needs during an outage, but it repeats them for every attempt: one line per kind of message every
    # KAFKA_CLIENT_LOG_EVERY_S, as our own event lines, with the count of those held back
    handler.addFilter(ClientLines("kafka", KAFKA_CLIENT_LOG_EVERY_S))
    logging.getLogger("kafka").setLevel(settings.kafka_client_level or "WARNING")
    # its event loop's "Task … ran for 0.118s (>0.100s threshold)" is about the client's own scheduling on a
    # busy machine, not about Kafka: errors only there
    if settings.kafka_client_level is None:
        logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


#: at most one line per kind of kafka-python message (logger and message template) this often
KAFKA_CLIENT_LOG_EVERY_S = 30.0


class ClientLines(logging.Filter):
    """A handler filter for a library's records (logger ``prefix`` and below): each becomes an event line
    ``event=<prefix>_client`` and, per logger and message template, at most one passes every ``every_s``
    seconds; the next one that passes says how many were held back (``suppressed``)."""

    def __init__(self, prefix: str, every_s: float, clock=time.monotonic):
        super().__init__()
        self.prefix, self.every_s, self.clock = prefix, every_s, clock
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name != self.prefix and not name.startswith(self.prefix + "."):
            return True
        key = (name, str(record.msg))
        now = self.clock()
        last, held = self.seen.get(key, (float("-inf"), 0))
        if now - last < self.every_s:
            self.seen[key] = (last, held + 1)
            return False
        self.seen[key] = (now, 0)
        record.event = f"{self.prefix}_client"
        record.fields = {"suppressed": held or None}
        return True


def event(logger: logging.Logger, name: str, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event: ``event(log, "page", "page 3 …", department="69", page=3)``."""
    logger.log(level, msg, extra={"event": name, "fields": fields})


def human_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def short_error(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line for a log field: its text with the whitespace folded (its type's name
    when it has no text), cut at ``limit`` characters."""
    return (" ".join(str(exc).split()) or type(exc).__name__)[:limit]
