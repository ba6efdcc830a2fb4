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
externalKafka.bootstrapServers).  Every Kafka client of the chart includes it, the wait-for-kafka init
container too: a connection setting added here (e.g. the client's security settings) reaches all. */}}
{{- define "dpe-ingest.env.kafkaConnection" -}}
- name: KAFKA_BOOTSTRAP_SERVERS
  value: {{ include "dpe-ingest.kafka.bootstrap" . | quote }}
{{- end -}}

{{/* env of every dpe-ingest program that reads or writes the topics: the bootstrap address, the topics
and how they are created, and the logs. */}}
{{- define "dpe-ingest.env.kafka" -}}
{{ include "dpe-ingest.env.kafkaConnection" . }}
- name: KAFKA_TOPIC
  value: {{ .Values.kafka.topic | quote }}
- name: KAFKA_DLQ_TOPIC
  value: {{ .Values.kafka.dlqTopic | quote }}
- name: KAFKA_TOPIC_PARTITIONS
  value: {{ .Values.kafka.topicPartitions | toString | quote }}
- name: KAFKA_REPLICATION_FACTOR
  value: {{ .Values.kafka.replicationFactor | toString | quote }}
{{ include "dpe-ingest.env.log" . }}
{{- end -}}

{{/* KAFKA_WAIT_S: how long a producer (and its init container) waits for Kafka to answer. */}}
{{- define "dpe-ingest.env.kafkaWait" -}}
- name: KAFKA_WAIT_S
  value: {{ .Values.producer.kafkaWaitSeconds | toString | quote }}
{{- end -}}

{{/* env of the programs that connect to PostgreSQL: DATABASE_URL, the password from its Secret as
PGPASSWORD, and libpq's PGSSLMODE when externalPostgresql.sslMode is set. */}}
{{- define "dpe-ingest.env.postgresql" -}}
{{- $secret := include "dpe-ingest.postgresql.secretRef" . | default "{}" | fromJson -}}
- name: DATABASE_URL
  value: {{ include "dpe-ingest.postgresql.url" . | quote }}
{{- if $secret.name }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret.name }}
      key: {{ $secret.key }}
{{- end }}
{{- with .Values.externalPostgresql.sslMode }}
- name: PGSSLMODE
  value: {{ . | quote }}
{{- end }}
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
{{- with $v.metrics.pushgatewayUrl }}
- name: METRICS_PUSHGATEWAY_URL
  value: {{ . | quote }}
{{- end }}
{{ include "dpe-ingest.env.kafkaWait" .root }}
{{ include "dpe-ingest.env.kafka" .root }}
{{- end -}}
