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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Iterable, TypeVar

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
