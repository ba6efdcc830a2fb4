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


#: while something we depend on keeps us waiting, a line at least this often (issue 23)
WAIT_LOG_S = 10.0


class Outage:
    """One server this process depends on (``name`` ``kafka`` or ``db``, called ``label`` at ``where`` in
    the lines) while it keeps the process waiting.  :meth:`failed` logs ``<name>_unavailable`` (WARNING) for
    a failure, :meth:`waiting` logs ``<name>_waiting`` (WARNING) when no line was written for nearly
    :data:`WAIT_LOG_S` (so a line at least every 10 s, whatever the backoff), :meth:`recovered` logs one
    ``<name>_recovered`` line; every line names the server and says how long the wait has lasted
    (``waited_s``).  Several threads may report on the same outage (a lock)."""

    def __init__(self, logger: logging.Logger, name: str, label: str, where: str, every_s: float | None = None,
                 clock=time.monotonic):
        import threading

        self.logger, self.name, self.label, self.where = logger, name, label, where
        self.every_s = WAIT_LOG_S if every_s is None else every_s
        self.clock = clock
        self.since: float | None = None  # when the outage began (None: not in one)
        self.last_line = float("-inf")
        self.lines = 0
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self.since is not None

    def waited(self) -> float:
        since = self.since
        return 0.0 if since is None else max(0.0, self.clock() - since)

    def _line(self, event_name: str, msg: str, level: int, now: float, fields: dict) -> None:
        self.last_line, self.lines = now, self.lines + 1
        what = fields.pop("what")  # first: lines are grepped for event=… what="…"
        event(self.logger, event_name, msg, level, what=what, **{self.name_field: self.where},
              waited_s=round(now - self.since, 1), **fields)

    @property
    def name_field(self) -> str:
        return "bootstrap" if self.name == "kafka" else "database"

    def failed(self, what: str, error: str, *, since: float | None = None, min_gap_s: float = 0.0,
               detail: str = "", level: int = logging.WARNING, event_name: str | None = None, **fields: Any) -> None:
        """A failure of ``what``: the outage begins (at ``since``, default now) if it had not; logged
        unless a line was written less than ``min_gap_s`` ago."""
        with self._lock:
            now = self.clock()
            if self.since is None:
                self.since = now if since is None else min(since, now)
            if now - self.last_line < min_gap_s:
                return
            self._line(event_name or f"{self.name}_unavailable",
                       f"{self.label} at {self.where} unavailable for {now - self.since:.0f}s during {what}: "
                       f"{error}{detail}", level, now, {"what": what, "error": error, **fields})

    def waiting(self, what: str, *, since: float | None = None, **fields: Any) -> None:
        """Still waiting for ``what``: a line if none was written for ``every_s`` - 1 s.  ``since``: the
        outage began then, if it was not known yet (a call that has not returned for a while)."""
        if self.since is None and since is None:
            return
        with self._lock:
            now = self.clock()
            if self.since is None:
                self.since = min(since, now)
            elif now - self.last_line < self.every_s - 1.0:
                return
            self._line(f"{self.name}_waiting", f"still waiting for {self.label} at {self.where}: "
                       f"{now - self.since:.0f}s so far ({what})", logging.WARNING, now, {"what": what, **fields})

    def recovered(self, what: str, **fields: Any) -> None:
        """``what`` succeeded: one ``<name>_recovered`` line if an outage was going on."""
        if self.since is None:
            return
        with self._lock:
            if self.since is None:
                return
            now = self.clock()
            if self.lines:
                self._line(f"{self.name}_recovered", f"{self.label} at {self.where} answers again after "
                           f"{now - self.since:.0f}s ({what})", logging.INFO, now, {"what": what, **fields})
            self.since, self.last_line, self.lines = None, float("-inf"), 0


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
