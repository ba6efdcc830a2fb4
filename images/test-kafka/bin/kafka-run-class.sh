#!/usr/bin/env bash
# kafka-run-class.sh CLASS [ARGS…] — run a Java class of Kafka with the jars of /opt/kafka/libs.
#
# dpe-test/kafka's own version of the distribution's launcher, with the same environment contract:
#   JAVA_HOME                   java to use (default: java on PATH)
#   KAFKA_HEAP_OPTS             default -Xmx256M
#   KAFKA_JVM_PERFORMANCE_OPTS  default G1 with short pauses, headless
#   KAFKA_GC_LOG_OPTS, KAFKA_JMX_OPTS, KAFKA_OPTS   added as given
#   KAFKA_LOG4J_OPTS            default: the tools' logging (config/tools-log4j2.yaml, stderr);
#                               when set, LOG_DIR is created
#   LOG_DIR                     -Dkafka.logs.dir (default /opt/kafka/logs)
set -o nounset -o errexit

if [ $# -lt 1 ]; then
    echo "usage: $0 CLASS [ARGS...]" >&2
    exit 1
fi
base_dir="$(cd "$(dirname "$0")/.." && pwd)"

java="java"
if [ -n "${JAVA_HOME:-}" ]; then
    java="$JAVA_HOME/bin/java"
fi
log_dir="${LOG_DIR:-$base_dir/logs}"
if [ -z "${KAFKA_LOG4J_OPTS:-}" ]; then
    log4j_opts="-Dlog4j2.configurationFile=$base_dir/config/tools-log4j2.yaml"
else
    log4j_opts="$KAFKA_LOG4J_OPTS"
    mkdir -p "$log_dir"
fi
heap="${KAFKA_HEAP_OPTS:--Xmx256M}"
perf="${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true}"

# The option variables hold several words each: split on purpose.
# shellcheck disable=SC2086
exec "$java" $heap $perf ${KAFKA_GC_LOG_OPTS:-} ${KAFKA_JMX_OPTS:-} "-Dkafka.logs.dir=$log_dir" $log4j_opts \
    -cp "$base_dir/libs/*" ${KAFKA_OPTS:-} "$@"
