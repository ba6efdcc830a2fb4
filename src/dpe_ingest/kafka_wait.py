"""Wait until Kafka answers, then exit: the producer Job's init container (``python -m dpe_ingest.kafka_wait``).

It uses the producer's own wait (``kafka_io.wait_for_kafka``: an admin client connecting, a warning line
per attempt naming the address) bounded by ``KAFKA_WAIT_S``, so a wrong address shows in ``kubectl
logs -c wait-for-kafka`` and fails the pod instead of leaving it in ``Init:0/1`` for ever.

Exit 0: Kafka answered; 1: it did not within KAFKA_WAIT_S (the last line says which address and how
long); 2: a bad setting (the line names it).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Mapping

from . import logs
from .config import ConfigError, KafkaSettings, kafka_wait_seconds

log = logging.getLogger("dpe_ingest.kafka_wait")

EXIT_UNREACHABLE = 1
EXIT_CONFIG = 2


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    logs.setup()
    try:
        kafka = KafkaSettings.from_env(env)
        bootstrap = kafka.bootstrap_servers
        wait_s = kafka_wait_seconds(env)
    except ConfigError as exc:
        logs.event(log, "config_error", str(exc), logging.ERROR)
        return EXIT_CONFIG
    from .kafka_io import KafkaUnavailable, wait_for_kafka

    logs.event(log, "kafka_wait_start", f"waiting up to {wait_s:g}s for Kafka at {bootstrap}",
               bootstrap=bootstrap, wait_s=wait_s)
    started = time.monotonic()
    try:
        wait_for_kafka(bootstrap, timeout_s=wait_s, security=kafka.security).close()
    except ConfigError as exc:  # KafkaAccessError: the brokers refused our credentials or certificates
        logs.event(log, "config_error", str(exc), logging.ERROR, bootstrap=bootstrap)
        return EXIT_CONFIG
    except KafkaUnavailable as exc:
        logs.event(log, "kafka_gave_up", f"gave up waiting for Kafka at {bootstrap} after "
                   f"{time.monotonic() - started:.0f}s (KAFKA_WAIT_S={wait_s:g}): {exc}; check the address "
                   "(kafka.enabled / externalKafka.bootstrapServers)", logging.ERROR, bootstrap=bootstrap,
                   wait_s=wait_s)
        return EXIT_UNREACHABLE
    logs.event(log, "kafka_ready", f"Kafka answers at {bootstrap} after {time.monotonic() - started:.1f}s",
               bootstrap=bootstrap)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
