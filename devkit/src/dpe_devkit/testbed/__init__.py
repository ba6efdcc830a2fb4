"""The testbed: real servers that tests, ``dpe-ingest testbed up`` and local runs start and stop.

- ``KafkaBroker`` (``testbed.kafka``): Apache Kafka 4.4.0, KRaft combined mode, jars from Maven Central.
- ``PostgresServer`` (``testbed.postgres``): the machine's PostgreSQL (Debian's 15), role/db ``dpe``.
- ``ensure_helm()`` (``testbed.helm``): helm v3.22.0 built from source into the cache.
- ``LocalServers``: Kafka + PostgreSQL (+ optionally the ADEME stand-in) together, with their environment::

      with LocalServers(standin=True) as servers:
          subprocess.run([...], env={**os.environ, **servers.env})

Everything listens on 127.0.0.1 on free ports; downloads and builds are cached in ``.cache/``
(``$DPE_CACHE_DIR``).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ._proc import LaunchError, cache_dir
from .helm import ensure_helm
from .kafka import KAFKA_VERSION, KafkaBroker
from .postgres import PostgresServer

__all__ = ["LocalServers", "LaunchError", "KafkaBroker", "PostgresServer", "ensure_helm", "cache_dir", "KAFKA_VERSION"]


class LocalServers:
    """Kafka + PostgreSQL (+ the ADEME stand-in when ``standin=True``) on free 127.0.0.1 ports.

    ``env`` gives KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL (and ADEME_API_URL with the stand-in).
    ``workdir`` (default: a new temp dir, deleted by ``stop()``) holds the data and the logs.
    """

    def __init__(self, workdir: Path | str | None = None, *, kafka: bool = True, postgres: bool = True,
                 standin: bool = False, dataset: Any = None, rows_per_department: int = 1000, seed: int = 1,
                 kafka_port: int | None = None, postgres_port: int | None = None, standin_port: int = 0) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dpe-testbed-")).resolve()
        self.kafka = KafkaBroker(self.workdir / "kafka", port=kafka_port) if kafka else None
        self.postgres = PostgresServer(self.workdir / "postgres", port=postgres_port) if postgres else None
        self._standin_wanted = standin
        self._standin_args = dict(dataset=dataset, rows=rows_per_department, seed=seed, port=standin_port)
        self.standin: Any = None
        self.timings: dict[str, float] = {}

    def start(self) -> "LocalServers":
        try:
            if self.postgres is not None:
                t0 = time.monotonic()
                self.postgres.start()
                self.timings["postgres"] = time.monotonic() - t0
            if self.kafka is not None:
                t0 = time.monotonic()
                self.kafka.start()
                self.timings["kafka"] = time.monotonic() - t0
            if self._standin_wanted and self.standin is None:
                from dpe_ingest.standin.data import Dataset
                from dpe_ingest.standin.server import StandinServer

                args = self._standin_args
                dataset = args["dataset"] or Dataset(rows_per_department=args["rows"], seed=args["seed"])
                self.standin = StandinServer(dataset=dataset, host="127.0.0.1", port=args["port"]).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.standin is not None:
            self.standin.stop()
            self.standin = None
        if self.kafka is not None:
            self.kafka.stop()
        if self.postgres is not None:
            self.postgres.cleanup()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.kafka is not None:
            env["KAFKA_BOOTSTRAP_SERVERS"] = self.kafka.bootstrap
        if self.postgres is not None:
            env["DATABASE_URL"] = self.postgres.url
        if self.standin is not None:
            env["ADEME_API_URL"] = self.standin.url
        return env

    def exports(self) -> str:
        return "\n".join(f"export {k}={v}" for k, v in self.env.items())

    def __enter__(self) -> "LocalServers":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
