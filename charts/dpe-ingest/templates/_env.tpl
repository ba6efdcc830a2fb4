{{/* =============================================================================================
Environment blocks: each group of variables of src/dpe_ingest/config.py's contract is written here
once, as one named helper, and every container that needs it includes that helper (the producer Jobs,
the refresh CronJobs, the consumer, analytics, the stand-in, the wait-for-kafka init container, the
helm test pods).  tests/chart/test_chart_one_source.py fails when a template names one of these
variables outside its helper.  Each helper renders a list at column 0: include it with nindent.
============================================================================================= */}}

{{/* LOG_FORMAT, LOG_LEVEL: every dpe-ingest program. */}}
{{- define "dpe-ingest.env.log" -}}
- name: LOG_FORMAT
  value: {{ .Values.log.format | quote }}
- name: LOG_LEVEL
  value: {{ .Values.log.level | quote }}
{{- end -}}

{{/* How a Kafka client reaches the brokers: KAFKA_BOOTSTRAP_SERVERS (the bundled broker's Service or
externalKafka), and with a secured external Kafka KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_* (the password only
as a secretKeyRef) and KAFKA_SSL_* (files of the Secret volumes of "dpe-ingest.kafkaConnection.volumes",
mounted by "dpe-ingest.kafkaConnection.volumeMounts").  Every Kafka client of the chart includes it (the
producer Jobs, the refresh CronJobs, the consumer, analytics, the wait-for-kafka init container, the helm
test pod), with those mounts; nothing beyond the bootstrap address for PLAINTEXT. */}}
{{- define "dpe-ingest.env.kafkaConnection" -}}
{{- $sec := include "dpe-ingest.kafka.security" . | fromJson -}}
- name: KAFKA_BOOTSTRAP_SERVERS
  value: {{ include "dpe-ingest.kafka.bootstrap" . | quote }}
{{- if ne $sec.protocol "PLAINTEXT" }}
- name: KAFKA_SECURITY_PROTOCOL
  value: {{ $sec.protocol | quote }}
{{- end }}
{{- if $sec.sasl }}
- name: KAFKA_SASL_MECHANISM
  value: {{ $sec.mechanism | quote }}
- name: KAFKA_SASL_USERNAME
  value: {{ $sec.username | quote }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $sec.passwordSecret | quote }}
      key: {{ $sec.passwordKey | quote }}
{{- end }}
{{- if $sec.caSecret }}
- name: KAFKA_SSL_CA_FILE
  value: /etc/dpe-ingest/kafka-ca/ca.crt
{{- end }}
{{- if $sec.clientSecret }}
- name: KAFKA_SSL_CERT_FILE
  value: /etc/dpe-ingest/kafka-client/tls.crt
- name: KAFKA_SSL_KEY_FILE
  value: /etc/dpe-ingest/kafka-client/tls.key
{{- end }}
{{- if and $sec.tls (not $sec.checkHostname) }}
- name: KAFKA_SSL_CHECK_HOSTNAME
  value: "false"
{{- end }}
{{- end -}}

{{/* env of every dpe-ingest program that reads or writes the topics: the connection, the topics and how
they are created (KAFKA_CREATE_TOPICS only when false, KAFKA_MIN_INSYNC_REPLICAS only when > 0: the
defaults leave the producer Jobs' specs, hence their names, as they were), and the logs. */}}
{{- define "dpe-ingest.env.kafka" -}}
{{- $minIsr := include "dpe-ingest.kafka.minInsyncReplicas" . | int -}}
{{ include "dpe-ingest.env.kafkaConnection" . }}
- name: KAFKA_TOPIC
  value: {{ .Values.kafka.topic | quote }}
- name: KAFKA_DLQ_TOPIC
  value: {{ .Values.kafka.dlqTopic | quote }}
- name: KAFKA_TOPIC_PARTITIONS
  value: {{ .Values.kafka.topicPartitions | toString | quote }}
- name: KAFKA_REPLICATION_FACTOR
  value: {{ .Values.kafka.topics.replicationFactor | toString | quote }}
{{- if gt $minIsr 0 }}
- name: KAFKA_MIN_INSYNC_REPLICAS
  value: {{ $minIsr | toString | quote }}
{{- end }}
{{- if not .Values.kafka.createTopics }}
- name: KAFKA_CREATE_TOPICS
  value: "false"
{{- end }}
{{ include "dpe-ingest.env.log" . }}
{{- end -}}

{{/* KAFKA_WAIT_S: how long a producer (and its init container) waits for Kafka to answer. */}}
{{- define "dpe-ingest.env.kafkaWait" -}}
- name: KAFKA_WAIT_S
  value: {{ .Values.producer.kafkaWaitSeconds | toString | quote }}
{{- end -}}

{{/* env of the programs that connect to PostgreSQL (consumer, analytics, refresh, the helm test's psql):
DATABASE_URL (never with a password) and libpq's own variables, each a value or a secretKeyRef: PGHOST,
PGPORT, PGDATABASE, PGUSER (external host/… or an operator's Secret), PGPASSWORD (always a Secret's key),
PGSSLMODE, and the files of "dpe-ingest.postgresql.volumes" (mounted by "dpe-ingest.postgresql.volumeMounts"):
PGSSLROOTCERT, PGSSLCERT, PGSSLKEY. */}}
{{- define "dpe-ingest.env.postgresql" -}}
{{- $c := include "dpe-ingest.postgresql.connection" . | fromJson -}}
- name: DATABASE_URL
  value: {{ $c.url | quote }}
{{- with $c.host }}
- name: PGHOST
  {{- include "dpe-ingest.env.valueOrSecret" . | nindent 2 }}
{{- end }}
{{- with $c.port }}
- name: PGPORT
  {{- include "dpe-ingest.env.valueOrSecret" . | nindent 2 }}
{{- end }}
{{- with $c.database }}
- name: PGDATABASE
  {{- include "dpe-ingest.env.valueOrSecret" . | nindent 2 }}
{{- end }}
{{- with $c.username }}
- name: PGUSER
  {{- include "dpe-ingest.env.valueOrSecret" . | nindent 2 }}
{{- end }}
{{- with $c.password }}
- name: PGPASSWORD
  {{- include "dpe-ingest.env.valueOrSecret" . | nindent 2 }}
{{- end }}
{{- with $c.sslMode }}
- name: PGSSLMODE
  value: {{ . | quote }}
{{- end }}
{{- if $c.caSecret }}
- name: PGSSLROOTCERT
  value: /etc/dpe-ingest/postgresql-ca/ca.crt
{{- end }}
{{- if $c.clientSecret }}
- name: PGSSLCERT
  value: /etc/dpe-ingest/postgresql-client/tls.crt
- name: PGSSLKEY
  value: /etc/dpe-ingest/postgresql-client/tls.key
{{- end }}
{{- end -}}

{{/* The value of one env entry: value, or valueFrom.secretKeyRef.  Argument: {value} or {secret, key}. */}}
{{- define "dpe-ingest.env.valueOrSecret" -}}
{{- if .secret -}}
valueFrom:
  secretKeyRef:
    name: {{ .secret | quote }}
    key: {{ .key | quote }}
{{- else -}}
value: {{ .value | quote }}
{{- end -}}
{{- end -}}

{{/* env of `dpe-ingest produce`, shared by the producer Jobs and the refresh CronJobs (one list, so the
two cannot drift apart): the API, the shared budget, the checkpoints, the slots, the wait for Kafka, the
Pushgateway, and Kafka and logs.  Argument: dict root, code (the department). */}}
{{- define "dpe-ingest.env.produce" -}}
{{- $v := .root.Values -}}
- name: DEPARTMENT
  value: {{ .code | quote }}
- name: ADEME_API_URL
  value: {{ include "dpe-ingest.ademe.url" .root | quote }}
- name: ADEME_PAGE_SIZE
  value: {{ $v.ademe.pageSize | toString | quote }}
{{- if and $v.ademe.maxRps (ne (toString $v.ademe.maxRps) "0") }}
- name: ADEME_MAX_RPS
  value: {{ $v.ademe.maxRps | toString | quote }}
{{- end }}
# the shared budget (ademe.maxTotalRps / departments) is a mounted ConfigMap, not env: an
# upgrade that adds a department changes the share of every producer without replacing Jobs
- name: ADEME_BUDGET_FILE
  value: /etc/dpe-ingest/budget/budget.json
{{- with $v.ademe.apiKey }}{{- if .existingSecret }}
- name: ADEME_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret | quote }}
      key: {{ .secretKey | default "apiKey" | quote }}
{{- end }}{{- end }}
{{- if and $v.ademe.rateWindowSeconds (ne (toString $v.ademe.rateWindowSeconds) "60") }}
- name: ADEME_RATE_WINDOW_S
  value: {{ $v.ademe.rateWindowSeconds | toString | quote }}
{{- end }}
{{- if and (hasKey $v.ademe "bandwidthBytesPerSecond") (ne (toString $v.ademe.bandwidthBytesPerSecond) "500000") }}
- name: ADEME_BANDWIDTH_BYTES_S
  value: {{ $v.ademe.bandwidthBytesPerSecond | toString | quote }}
{{- end }}
{{- if and (hasKey $v.ademe "computeMsPerWindow") (ne (toString $v.ademe.computeMsPerWindow) "20000") }}
- name: ADEME_COMPUTE_MS
  value: {{ $v.ademe.computeMsPerWindow | toString | quote }}
{{- end }}
{{- with $v.ademe.dateFrom }}
- name: ADEME_DATE_FROM
  value: {{ . | toString | quote }}
{{- end }}
{{- with $v.ademe.dateTo }}
- name: ADEME_DATE_TO
  value: {{ . | toString | quote }}
{{- end }}
{{- with $v.ademe.extraFields }}
- name: ADEME_EXTRA_FIELDS
  value: {{ . | toString | quote }}
{{- end }}
- name: ADEME_TIMEOUT_S
  value: {{ $v.ademe.timeoutSeconds | toString | quote }}
- name: ADEME_MAX_RETRIES
  value: {{ $v.ademe.maxRetries | toString | quote }}
- name: ADEME_RETRY_MAX_S
  value: {{ $v.ademe.retryMaxSeconds | toString | quote }}
- name: PRODUCER_CHECKPOINT_TOPIC
  value: {{ $v.producer.checkpointTopic | quote }}
{{- if $v.producer.maxConcurrent }}
- name: PRODUCER_MAX_CONCURRENT
  value: {{ $v.producer.maxConcurrent | toString | quote }}
{{- end }}
{{- if and (hasKey $v.producer "budgetPartitions") (ne (toString $v.producer.budgetPartitions) "120") }}
- name: PRODUCER_BUDGET_PARTITIONS
  value: {{ $v.producer.budgetPartitions | toString | quote }}
{{- end }}
{{- with $v.metrics.pushgatewayUrl }}
- name: METRICS_PUSHGATEWAY_URL
  value: {{ . | quote }}
- name: METRICS_PUSHGATEWAY_GROUPING
  value: {{ printf "namespace=%s,release=%s" $.root.Release.Namespace $.root.Release.Name | quote }}
{{- end }}
{{ include "dpe-ingest.env.kafkaWait" .root }}
{{ include "dpe-ingest.env.kafka" .root }}
{{- end -}}
