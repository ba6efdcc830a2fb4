#!/usr/bin/env bash
# kafka-topics.sh --bootstrap-server HOST:PORT --list|--describe|--create … — Kafka's TopicCommand.
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.TopicCommand "$@"
