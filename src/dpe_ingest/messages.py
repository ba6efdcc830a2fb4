"""The contract of the messages on the data topic, shared by the producer, the sink and the analytics.

No dependency beyond the standard library: the producer image imports it without psycopg2.

- A row is a JSON object keyed by ``numero_dpe`` (see :mod:`dpe_ingest.sink` for its columns).
- A deletion is ``{"numero_dpe": …, "departement": <the department that no longer lists it>,
  "_deleted": true}``: a refresh found the certificate gone from its department in the API.  It
  deletes the stored row **only while that row still belongs to that department**: a certificate
  that moved (geocoded later, or corrected) is upserted by its new department's refresh and must
  survive the old department's deletion, whichever of the two messages is written first.
- :func:`settle` folds the messages of one batch, in order, into one action per key, so that a batch
  writes what applying its messages one by one would leave.

Dead letters (topic ``KAFKA_DLQ_TOPIC``): what the producer or the consumer refuses goes there, with why,
in one format for both sides, so a user reads one topic to see every refused row:

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
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, Iterable, TypeVar

#: a message with this flag set deletes its numero_dpe, if the stored row is still of its department
DELETED_FLAG = "_deleted"

T = TypeVar("T")


def deletion(numero_dpe: str, departement: str | None) -> dict:
    """The deletion message of ``numero_dpe`` for the department that no longer lists it (None: the
    rows without a department)."""
    return {"numero_dpe": numero_dpe, "departement": departement, DELETED_FLAG: True}


@dataclass(frozen=True)
class Deletion:
    """What a run of messages leaves for one key when it ends in deletions: delete the stored row if its
    department is one of ``departments``; ``departments`` None: whatever the stored row is (the run
    itself upserted the row into the department that then deleted it)."""

    key: str
    departments: frozenset | None

    def applies_to(self, stored_department: Hashable) -> bool:
        return self.departments is None or stored_department in self.departments


@dataclass(frozen=True)
class Settled(Generic[T]):
    upserts: list  # the last upsert of each key that ends on one, in the order of their last messages
    deletions: list  # a Deletion for each key whose run ends in deletions


def settle(items: Iterable[T], key: Callable[[T], str], department: Callable[[T], Hashable],
           is_deletion: Callable[[T], bool]) -> Settled[T]:
    """One action per key that leaves the table as applying ``items`` one by one would.

    ``items`` are in offset order per partition (a key lives in one partition, so per key too).  An
    upsert replaces whatever came before it.  A deletion after an upsert of the same department
    deletes it whatever was stored; after an upsert of another department it does nothing (the row
    moved); with no upsert before it, it applies to the stored row if that row is of its department."""
    state: dict[str, object] = {}
    for item in items:
        k = key(item)
        before = state.pop(k, None)  # re-inserted: the order of the last messages is kept
        if not is_deletion(item):
            state[k] = item
            continue
        dep = department(item)
        if before is None:
            state[k] = Deletion(k, frozenset((dep,)))
        elif isinstance(before, Deletion):
            state[k] = before if before.departments is None else Deletion(k, before.departments | {dep})
        elif department(before) == dep:
            state[k] = Deletion(k, None)
        else:
            state[k] = before
    upserts, deletions = [], []
    for action in state.values():
        (deletions if isinstance(action, Deletion) else upserts).append(action)
    return Settled(upserts, deletions)


# ---------------------------------------------------------------------------------------------
# dead letters
# ---------------------------------------------------------------------------------------------
#: one dead letter as it is sent: (key, value, headers)
Letter = tuple[bytes | None, bytes, list]


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


def parse_dead_letter(value: bytes) -> dict:
    """Decode a dead letter's value (for status, tests and users' tools)."""
    return json.loads(value.decode("utf-8"))


def dead_letter(reason: str, stage: str, key: bytes | None, **fields: Any) -> Letter:
    """(key, value, headers) of one dead letter: :func:`build`'s value and headers under ``key``."""
    value, headers = build(reason, stage, **fields)
    return key, value, headers
