#!/bin/bash
# Start script of dpe-test/kafdrop (images/test-kafdrop/Dockerfile): the environment contract of
# upstream's kafdrop.sh at 4.1.0, written here (not copied).
set -euo pipefail

jmx_port="${PORT0:-${JMX_PORT:-}}"   # a scheduler-assigned port wins, as upstream
host="${HOST:-localhost}"

jvm_args=(--add-opens=java.base/sun.nio.ch=ALL-UNNAMED -Xss256K)
if [ -n "$jmx_port" ]; then
    jvm_args+=(-Dcom.sun.management.jmxremote "-Dcom.sun.management.jmxremote.port=$jmx_port"
               "-Dcom.sun.management.jmxremote.rmi.port=$jmx_port" -Dcom.sun.management.jmxremote.local.only=false
               -Dcom.sun.management.jmxremote.authenticate=false -Dcom.sun.management.jmxremote.ssl=false
               "-Djava.rmi.server.hostname=$host")
fi
if [ -n "${MARATHON_APP_RESOURCE_MEM:-}" ]; then
    mem="${MARATHON_APP_RESOURCE_MEM%.*}"
    jvm_args+=("-Xms${mem}m" "-Xmx${mem}m")
fi

# base64 content given in the environment -> the file Kafdrop reads (relative to the working directory)
write_b64() {  # VALUE FILE WHAT
    if [ -n "$1" ]; then
        echo "kafdrop.sh: writing $3 into $2"
        printf '%s' "$1" | base64 --decode --ignore-garbage > "$2"
    fi
}
write_b64 "${KAFKA_PROPERTIES:-}" "${KAFKA_PROPERTIES_FILE:-kafka.properties}" "the Kafka properties"
write_b64 "${KAFKA_TRUSTSTORE:-}" "${KAFKA_TRUSTSTORE_FILE:-kafka.truststore.jks}" "the Kafka truststore"
write_b64 "${KAFKA_KEYSTORE:-}" "${KAFKA_KEYSTORE_FILE:-kafka.keystore.jks}" "the Kafka keystore"

# JVM_OPTS and CMD_ARGS are split on spaces, as upstream's unquoted expansions are
# shellcheck disable=SC2086
exec java "${jvm_args[@]}" ${JVM_OPTS:-} -Dloader.path=/extra-classes -jar /kafdrop/kafdrop-4.1.0.jar ${CMD_ARGS:-}
