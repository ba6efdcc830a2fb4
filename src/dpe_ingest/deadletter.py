"""Dead letters: what the producer or the consumer refuses goes to the dead-letter topic, with why.

One message format for both sides, so a user reads one topic to see every refused row:

- key: the original key (numero_dpe) when there is one, else ``None``
- value: JSON ``{"reason", "stage", "department", "payload", "payload_b64", "source": {topic,
  partition, offset} | null, "at"}``; ``payload`` is the row as received when it was JSON,
  ``payload_b64`` the raw bytes when they were not valid UTF-8/JSON.
- headers: ``dlq.reason`` and ``dlq.stage``, so Kafdrop shows why without decoding the value.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any


def build(
    reason: str,
    stage: str,
    *,
    payload: Any = None,
    raw: bytes | None = None,
    department: str | None = None,
    source: dict | None = None,
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Return (value bytes, headers) of one dead letter.  ``stage`` is ``producer`` or ``consumer``."""
    doc: dict[str, Any] = {
        "reason": reason,
        "stage": stage,
        "department": department,
        "payload": payload,
        "payload_b64": base64.b64encode(raw).decode("ascii") if raw is not None else None,
        "source": source,
        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
    }
    value = json.dumps(doc, ensure_ascii=False, default=str).encode("utf-8")
    headers = [("dlq.reason", reason.encode("utf-8")[:1000]), ("dlq.stage", stage.encode("ascii"))]
    return value, headers


def parse(value: bytes) -> dict:
    """Decode a dead letter's value (for status, tests and users' tools)."""
    return json.loads(value.decode("utf-8"))
