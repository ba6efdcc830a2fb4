"""The share of the release's API budget a producer may use now, handed over through Kafka.

data-fair limits a client (one IP: every Job of a cluster behind its NAT) to requests, compute and
bandwidth per window.  The producers of a release divide those limits among themselves *dynamically*:
a Kafka consumer group is the ledger.  The budget topic ``<checkpoint topic>-budget-<n>`` has ``n``
partitions (``PRODUCER_BUDGET_PARTITIONS``, 120 by default); every producer that is paging joins the
group ``<topic>`` and its share is ``its partitions / n``.  The group coordinator spreads the partitions
evenly (round robin: each member ``floor`` or ``ceil`` of ``n / members``), so when a department
finishes (its producer leaves the group: ``close()``) its partitions go to those still running, and a
new department takes its part at the next rebalance, with no file to rewrite and no Job to replace.

- Rebalances take a heartbeat or two (``HEARTBEAT_MS``): meanwhile each member keeps its last share, a
  newcomer has none yet (it waits), so the shares never add up to more than the whole.
- More members than partitions: the members without a partition wait (share 0) until one frees — at
  most ``n`` producers page at once.
- A member that dies holds its share until the session timeout (``SESSION_MS``): the budget is
  under-used for that long, never over-used.
- Kafka unreachable when joining (``join_timeout_s``): the static share (``fallback``: 1 / the
  departments of the chart's budget file) applies, and is logged; Kafka lost afterwards: the last share
  stays (the producer cannot write its rows anyway).
- Secured brokers: the consumer gets ``kafka_security.client_options`` like every client; its ACLs:
  READ on the topic and the group, CREATE on the topic when the producers create it (docs/chart.md).
"""

from __future__ import annotations

import logging
import threading
import time

from . import logs
from .config import KafkaSecurity, KafkaSettings
from .kafka_io import TopicSpec, _durability, ensure_topics, wait_for_kafka
from .kafka_security import client_options

log = logging.getLogger("dpe_ingest.budget")

HEARTBEAT_MS = 1000
SESSION_MS = 10000
POLL_S = 0.5


def budget_topic(settings: KafkaSettings, checkpoint_topic: str, n: int) -> TopicSpec:
    """The budget's topic (PRODUCER_BUDGET_PARTITIONS=n): n partitions, never written to."""
    return TopicSpec(f"{checkpoint_topic}-budget-{n}", n, settings.replication_factor, _durability(settings))


class BudgetShare:
    """This producer's share of the release's budget (0..1), kept up to date by a background thread."""

    def __init__(self, bootstrap: str, spec: TopicSpec, context: dict | None = None,
                 security: KafkaSecurity | None = None, fallback: float = 1.0, join_timeout_s: float = 60.0):
        self.bootstrap, self.spec, self.context, self.security = bootstrap, spec, context or {}, security
        self.topic, self.n = spec.name, spec.partitions
        self.fallback, self.join_timeout_s = fallback, join_timeout_s
        self._share: float | None = None  # None: not joined (the caller's static share applies)
        self.consumer = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.changes = 0
        self._prepared = False
        self._disabled: str | None = None  # why the group cannot be used (the static share applies)
        self._assigned: int | None = None  # partitions of the last completed rebalance (None: none yet)

    # ----------------------------------------------------------------------------------------- reading
    def share(self) -> float | None:
        """The share now; 0 = a member without a partition (wait); None = not a member (static share)."""
        return self._share

    @staticmethod
    def of(assigned: int, n: int) -> float:
        return assigned / n if n > 0 else 0.0

    # ----------------------------------------------------------------------------------------- joining
    def prepare(self, admin, create: bool = True) -> None:
        """Make sure the budget topic exists, with the producer's admin client (one connection less per
        producer at start).  A topic we may not create or read (ACLs of a secured cluster, topics managed
        elsewhere) is no reason to stop ingesting: the static share applies, and the warning names the
        topic and the group to grant."""
        try:
            ensure_topics(admin, [self.spec], self.security, create=create)
            self._prepared = True
        except Exception as exc:  # noqa: BLE001 - ConfigError, KafkaAccessError, KafkaError: fall back
            self._disabled = (f"topic {self.topic} unavailable ({type(exc).__name__}: {str(exc)[:300]}); grant READ "
                              f"and CREATE on the topic and READ on the group {self.topic}, or create the topic with "
                              f"{self.n} partitions")

    def join(self, stop: threading.Event | None = None) -> None:
        """Join the group and wait for the first assignment (at most ``join_timeout_s``: then the static
        share stays and the group is still joined in the background)."""
        if self.consumer is not None or self._stop.is_set():
            return
        if self._disabled:
            self._fall_back(self._disabled)
            self._stop.set()
            return
        from kafka import KafkaConsumer
        from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

        from .kafka_consumer import RebalanceListener

        try:
            if not self._prepared:
                admin = wait_for_kafka(self.bootstrap, timeout_s=self.join_timeout_s, context=self.context,
                                       security=self.security)
                try:
                    ensure_topics(admin, [self.spec], self.security)
                finally:
                    admin.close()
            self.consumer = KafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=self.topic, client_id="dpe-ingest-budget",
                enable_auto_commit=False, auto_offset_reset="latest",
                partition_assignment_strategy=[RoundRobinPartitionAssignor],
                session_timeout_ms=SESSION_MS, heartbeat_interval_ms=HEARTBEAT_MS,
                max_poll_interval_ms=60000, **client_options(self.security))
            self.consumer.subscribe([self.topic], listener=RebalanceListener(self))
        except Exception as exc:  # noqa: BLE001 - KafkaError, OSError, anything: the static share is the fallback
            self._fall_back(f"{type(exc).__name__}: {str(exc)[:200]}")
            return
        deadline = time.monotonic() + self.join_timeout_s
        while self._share is None and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                break
            self._poll_once()
        if self._share is None:
            self._fall_back(f"no assignment in {self.join_timeout_s:.0f}s")
        self._thread = threading.Thread(target=self._keep, name="budget", daemon=True)
        self._thread.start()

    def _fall_back(self, why: str) -> None:
        logs.event(log, "budget_fallback", f"API budget group {self.topic} not joined ({why}): using the static "
                   f"share {self.fallback:.4f} until it is", logging.WARNING, share=round(self.fallback, 4),
                   **self.context)
        self._share = None

    # kafka-python's rebalance callbacks (through kafka_consumer.RebalanceListener), called inside poll()
    def on_partitions_revoked(self, revoked) -> None:
        """A rebalance begins: the last share stays until it completes (a newcomer has none yet, so the
        shares never add up to more than the whole)."""

    def on_partitions_assigned(self, assigned) -> None:
        held = self.consumer.assignment()  # the whole assignment (``assigned`` is only what was added
        self._assigned = len(held)         # under a cooperative protocol)
        if held:
            self.consumer.pause(*held)  # group membership only: nothing is ever fetched

    def on_partitions_lost(self, lost) -> None:
        """Evicted (a missed session): the partitions may be someone else's already, so no share until
        the next assignment."""
        self._assigned = 0

    def _poll_once(self) -> None:
        try:
            self.consumer.poll(timeout_ms=int(POLL_S * 1000))
        except Exception:  # noqa: BLE001 - Kafka lost: the last share stays
            time.sleep(POLL_S)
            return
        assigned = self._assigned
        if assigned is None:
            return  # not assigned yet: the caller's static share (or waiting) applies
        share = self.of(assigned, self.n)
        if share != self._share:
            self.changes += 1
            # a hundred producers hand shares over a hundred times: the first share and a wait (none) at
            # INFO, the other changes at DEBUG (each page line carries the share now)
            level = logging.INFO if self._share is None or not share or not self._share else logging.DEBUG
            logs.event(log, "budget_share", f"API budget share {assigned}/{self.n} partitions = {share:.4f}"
                       + (" (none: waiting for a partition to free)" if not assigned else ""), level,
                       share=round(share, 4), partitions=assigned, of=self.n, **self.context)
            self._share = share

    def _keep(self) -> None:
        while not self._stop.is_set():
            if self.consumer is None:
                return
            self._poll_once()

    # ----------------------------------------------------------------------------------------- leaving
    def close(self) -> None:
        """Leave the group at once: the partitions go to the producers still running."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._share = None  # what is left (a last check of the dataset) goes at the static share
        if self.consumer is not None:
            try:
                self.consumer.close()
            except Exception:  # noqa: BLE001 - leaving is best effort; the session timeout does it too
                pass
            self.consumer = None
            logs.event(log, "budget_left", "left the API budget group: its share goes to the producers still "
                       "running", **self.context)
