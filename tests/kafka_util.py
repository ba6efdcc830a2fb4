"""Test helpers: read a whole topic, run the package's commands as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

from dpe_devkit.testbed.kafka import read_topic as testbed_read_topic


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
    """Every record of ``topic`` from the beginning to its end offsets now ([] if there is no such topic)."""
    records = testbed_read_topic(bootstrap, topic, timeout_s) or []
    return [Record(r.partition, r.offset, r.key, r.value, list(r.headers or [])) for r in records]


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
