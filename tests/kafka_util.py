"""Test helpers: read a whole topic, run the package's commands as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition


@dataclass
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list

    def json(self):
        return json.loads(self.value)


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[Record]:
    """Every record of ``topic`` from the beginning to its end offsets now."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        deadline = time.monotonic() + timeout_s
        parts = consumer.partitions_for_topic(topic)
        while parts is None and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(topic)
        if parts is None:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        out: list[Record] = []
        while any(consumer.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read {topic} to its end in {timeout_s}s"
            for tp, recs in consumer.poll(timeout_ms=1000, max_records=10000).items():
                out += [Record(r.partition, r.offset, r.key, r.value, list(r.headers or [])) for r in recs]
        return out
    finally:
        consumer.close()


def duplicates(records: list[Record]) -> int:
    counts = Counter(r.key for r in records)
    return sum(n - 1 for n in counts.values())


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dpe_ingest", *args]


def start(args: list[str], env: dict[str, str], log_path) -> subprocess.Popen:
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    fh = open(log_path, "wb")
    return subprocess.Popen(args, env=full_env, stdout=fh, stderr=subprocess.STDOUT)


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=timeout)


def events(text: str, name: str) -> list[dict[str, str]]:
    """Parse our logfmt lines with ``event=name`` into dicts (values unquoted)."""
    import shlex

    out = []
    for line in text.splitlines():
        if f"event={name} " not in line:
            continue
        fields = {}
        for token in shlex.split(line):
            if "=" in token:
                k, v = token.split("=", 1)
                fields[k] = v
        out.append(fields)
    return out
