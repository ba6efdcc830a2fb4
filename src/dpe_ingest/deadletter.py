"""Dead letters: what the producer or the consumer refuses goes to the dead-letter topic, with why.

One message format for both sides, so a user reads one topic to see every refused row:

- key: the original key (numero_dpe) when there is one, else ``None``
- value: JSON ``{"id", "reason", "stage", "department", "payload", "payload_b64", "source", "at"}``;
  ``payload`` is the row as received when it was JSON, ``payload_b64`` the raw bytes when they were
  not valid UTF-8/JSON; ``source`` is ``{topic, partition, offset}`` (consumer) or ``{api_url, page,
  after, index}`` (producer).
  ``payload`` is null when the row cannot be written as JSON at all (an integer beyond 4300 digits, values
  nested about 1000 deep): the reason then ends with why.
- headers: ``dlq.reason``, ``dlq.stage`` and ``dlq.id``, so Kafdrop shows why without decoding the value.

Dead letters are at-least-once (a producer resumed from its checkpoint re-reads one page, a consumer
replays an uncommitted batch), so a letter may be sent twice.  ``id`` names the refused row, the same
on every replay: ``consumer:<topic>/<partition>/<offset>`` or ``producer:<department>/<after>/<index>``
(``after`` is the cursor the page was fetched with, ``-`` for the first page).  Count distinct ids.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any


def consumer_id(topic: str, partition: int, offset: int) -> str:
    """The id of a message the consumer refuses: where it sits in the topic."""
    return f"consumer:{topic}/{partition}/{offset}"


def producer_id(department: str, after: str | None, index: int) -> str:
    """The id of a row the producer refuses: the page's cursor (what a resume re-reads) and its place."""
    return f"producer:{department}/{after or '-'}/{index}"


def build(
    reason: str,
    stage: str,
    *,
    letter_id: str,
    payload: Any = None,
    raw: bytes | None = None,
    department: str | None = None,
    source: dict | None = None,
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Return (value bytes, headers) of one dead letter.  ``stage`` is ``producer`` or ``consumer``;
    ``letter_id`` comes from :func:`consumer_id` or :func:`producer_id`."""
    doc: dict[str, Any] = {
        "id": letter_id,
        "reason": reason,
        "stage": stage,
        "department": department,
        "payload": payload,
        "payload_b64": base64.b64encode(raw).decode("ascii") if raw is not None else None,
        "source": source,
        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
    }
    try:
        value = _dumps(doc)
    except (ValueError, RecursionError) as exc:  # the payload: an integer beyond 4300 digits, nesting ~1000 deep
        doc["reason"] = reason = f"{reason} (payload not kept: {type(exc).__name__}: {str(exc)[:200]})"
        doc["payload"] = None
        value = _dumps(doc)
    headers = [("dlq.reason", reason.encode("utf-8", "backslashreplace")[:1000]), ("dlq.stage", stage.encode("ascii")),
               ("dlq.id", letter_id.encode("utf-8", "backslashreplace"))]
    return value, headers


def _dumps(doc: dict) -> bytes:
    try:
        return json.dumps(doc, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON's \u escapes can carry one): escaped, valid UTF-8
        return json.dumps(doc, ensure_ascii=True, default=str).encode("ascii")


def parse(value: bytes) -> dict:
    """Decode a dead letter's value (for status, tests and users' tools)."""
    return json.loads(value.decode("utf-8"))
