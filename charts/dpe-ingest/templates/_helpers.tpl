{{/* =============================================================================================
Names and labels
============================================================================================= */}}

{{/* Prefix of every object name: the release name (or fullnameOverride), cut so that the longest
name (<prefix>-producer-976-<8 hex>) stays within the 63 characters of a label value. */}}
{{- define "dpe-ingest.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "dpe-ingest.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that never change for a release: selectors and pod templates (Job pod templates must
render identically across upgrades, so no chart version here).  Argument: dict root, component. */}}
{{- define "dpe-ingest.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of the objects themselves (metadata, mutable).  Argument: dict root, component. */}}
{{- define "dpe-ingest.labels" -}}
{{ include "dpe-ingest.selectorLabels" . }}
app.kubernetes.io/part-of: dpe-ingest
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "dpe-ingest.chart" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod template labels: stable ones only.  Argument: dict root, component. */}}
{{- define "dpe-ingest.podLabels" -}}
{{ include "dpe-ingest.selectorLabels" . }}
app.kubernetes.io/part-of: dpe-ingest
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* image reference.  Argument: dict root, image (the values' image block). */}}
{{- define "dpe-ingest.image" -}}
{{- if not .image.repository -}}
{{- fail "an image repository is empty: set producer.image.repository / consumer.image.repository (e.g. dpe-ingest-producer)" -}}
{{- end -}}
{{- printf "%s:%s" .image.repository (toString (default .root.Chart.AppVersion .image.tag)) -}}
{{- end -}}

{{/* =============================================================================================
Departments
============================================================================================= */}}

{{/* The department codes are src/dpe_ingest/departments.py's (ALL_CODES, VALID_FORMS): that module is the one
source.  The chart cannot import it, so these two helpers are its transcription, the only one in the chart
(values.schema.json checks types only: its messages could only quote a regular expression).
tests/chart/test_chart_departments.py renders "dpe-ingest.department.canonical" for every code of up to
three characters, numbers and edge cases, against departments.normalize, and the error message against
VALID_FORMS: it fails as soon as the two differ. */}}
{{- define "dpe-ingest.validForms" -}}01..19, 2A, 2B, 21..95, 971..978, 988, none (rows without a department){{- end -}}
{{- define "dpe-ingest.departmentPattern" -}}^(0[1-9]|1[0-9]|2[AB]|2[1-9]|[3-8][0-9]|9[0-5]|97[1-8]|988|none)${{- end -}}

{{/* One department code (string, int64 or float64 as --set / YAML typed it) -> canonical code, as
departments.normalize: 1 -> 01, "2a" -> 2A, "NONE" -> none (the rows without code_departement_ban);
"" for anything that is not a code. */}}
{{- define "dpe-ingest.department.canonical" -}}
{{- if has (kindOf .) (list "string" "int" "int64" "float64") -}}
{{- $text := toString . | trim | upper -}}
{{- if regexMatch "^[0-9]$" $text -}}{{- $text = printf "0%s" $text -}}{{- end -}}
{{- if eq $text "NONE" -}}{{- $text = "none" -}}{{- end -}}
{{- if regexMatch (include "dpe-ingest.departmentPattern" .) $text -}}{{- $text -}}{{- end -}}
{{- end -}}
{{- end -}}

{{/* One department code -> canonical code (above); fails with a sentence naming the value and the
valid forms. */}}
{{- define "dpe-ingest.department" -}}
{{- $raw := . -}}
{{- $kind := kindOf $raw -}}
{{- if not (has $kind (list "string" "int" "int64" "float64")) -}}
{{- fail (printf "departments: invalid department code %v (a %s): valid forms are %s, e.g. departments=\"{69,01,2A}\"" $raw $kind (include "dpe-ingest.validForms" .)) -}}
{{- end -}}
{{- $code := include "dpe-ingest.department.canonical" $raw -}}
{{- if not $code -}}
{{- fail (printf "departments: invalid department code %q: valid forms are %s (1..9 are read as 01..09, 2a/2b as 2A/2B)" (toString $raw) (include "dpe-ingest.validForms" .)) -}}
{{- end -}}
{{- $code -}}
{{- end -}}

{{/* .Values.departments (list, comma/space separated string, or one number) -> JSON list of
distinct canonical codes, in the given order.  Use: include ... | fromJsonArray */}}
{{- define "dpe-ingest.departments" -}}
{{- $raw := .Values.departments -}}
{{- $items := list -}}
{{- if kindIs "slice" $raw -}}
{{- $items = $raw -}}
{{- else if kindIs "string" $raw -}}
{{- $items = regexSplit "[,; ]+" (trim $raw) -1 -}}
{{- else if kindIs "invalid" $raw -}}
{{- $items = list -}}
{{- else -}}
{{- $items = list $raw -}}
{{- end -}}
{{- $codes := list -}}
{{- range $items -}}
{{- if not (and (kindIs "string" .) (eq (trim .) "")) -}}
{{- $code := include "dpe-ingest.department" . -}}
{{- if not (has $code $codes) -}}{{- $codes = append $codes $code -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- if not $codes -}}
{{- fail (printf "departments is empty: give at least one department code, e.g. --set departments=\"{69,01,38}\" (valid forms are %s)" (include "dpe-ingest.validForms" .)) -}}
{{- end -}}
{{- toJson $codes -}}
{{- end -}}

{{/* producer.rerun with canonical keys -> JSON object {"69": "2"}.  Keys are validated like
departments; values are run numbers (0 = no re-run). */}}
{{- define "dpe-ingest.producer.reruns" -}}
{{- $out := dict -}}
{{- range $key, $run := (.Values.producer.rerun | default dict) -}}
{{- $code := include "dpe-ingest.department" $key -}}
{{- $_ := set $out $code (include "dpe-ingest.runNumber" (dict "value" $run "what" (printf "producer.rerun.%s" $key))) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* A run number (int or numeric string) -> its decimal string.  Argument: dict value, what. */}}
{{- define "dpe-ingest.runNumber" -}}
{{- $text := toString (.value | default 0) | trim -}}
{{- if not (regexMatch "^[0-9]{1,6}$" $text) -}}
{{- fail (printf "%s=%v: a run number is a whole number >= 0 (0 = no re-run, 1, 2, … = re-run from the start)" .what .value) -}}
{{- end -}}
{{- $text | atoi | toString -}}
{{- end -}}

{{/* =============================================================================================
Endpoints
============================================================================================= */}}

{{- define "dpe-ingest.kafka.bootstrap" -}}
{{- if .Values.kafka.enabled -}}
{{- printf "%s-kafka:9092" (include "dpe-ingest.fullname" .) -}}
{{- else -}}
{{- $strimzi := .Values.externalKafka.strimzi | default dict -}}
{{- $servers := .Values.externalKafka.bootstrapServers | default "" | toString | trim -}}
{{- if and (not $servers) $strimzi.cluster -}}
{{- $servers = printf "%s-kafka-bootstrap:%v" $strimzi.cluster ($strimzi.port | default 9093) -}}
{{- end -}}
{{- if not $servers -}}
{{- fail "kafka.enabled=false needs externalKafka.bootstrapServers (host:port[,host:port…] reachable from the pods) or externalKafka.strimzi.cluster" -}}
{{- end -}}
{{- range (splitList "," $servers) -}}
{{- if not (regexMatch "^[^:, ]+:[0-9]+$" (trim .)) -}}
{{- fail (printf "externalKafka.bootstrapServers=%q: expected host:port[,host:port…]" $servers) -}}
{{- end -}}
{{- end -}}
{{- $servers -}}
{{- end -}}
{{- end -}}

{{/* How the Kafka clients authenticate and check the brokers, resolved from externalKafka (its explicit
settings first, then the strimzi preset's, then the defaults): JSON {protocol, sasl, mechanism, username,
passwordSecret, passwordKey, tls, caSecret, caKey, clientSecret, certKey, keyKey, checkHostname}.  The
bundled broker is PLAINTEXT.  Refuses combinations the clients would refuse, naming the values.
Use: include … | fromJson (env.kafkaConnection, kafkaConnection.volumes/volumeMounts). */}}
{{- define "dpe-ingest.kafka.security" -}}
{{- $out := dict "protocol" "PLAINTEXT" "sasl" false "tls" false -}}
{{- if not .Values.kafka.enabled -}}
{{- $x := .Values.externalKafka -}}
{{- $sasl := $x.sasl | default dict -}}
{{- $tls := $x.tls | default dict -}}
{{- $st := $x.strimzi | default dict -}}
{{- $preset := dict -}}
{{- if $st.cluster -}}
{{- if not $st.user -}}
{{- fail (printf "externalKafka.strimzi.cluster=%s needs externalKafka.strimzi.user: the KafkaUser whose Secret (same name) the pipeline authenticates with" $st.cluster) -}}
{{- end -}}
{{- $_ := set $preset "caSecret" (printf "%s-cluster-ca-cert" $st.cluster) -}}
{{- $_ := set $preset "caKey" "ca.crt" -}}
{{- if eq $st.authentication "tls" -}}
{{- $_ := set $preset "protocol" "SSL" -}}
{{- $_ := set $preset "clientSecret" $st.user -}}
{{- $_ := set $preset "certKey" "user.crt" -}}
{{- $_ := set $preset "keyKey" "user.key" -}}
{{- else if eq $st.authentication "scram-sha-512" -}}
{{- $_ := set $preset "protocol" "SASL_SSL" -}}
{{- $_ := set $preset "mechanism" "SCRAM-SHA-512" -}}
{{- $_ := set $preset "username" $st.user -}}
{{- $_ := set $preset "passwordSecret" $st.user -}}
{{- $_ := set $preset "passwordKey" "password" -}}
{{- else -}}
{{- fail (printf "externalKafka.strimzi.authentication=%v: expected scram-sha-512 or tls (the KafkaUser's spec.authentication.type)" $st.authentication) -}}
{{- end -}}
{{- end -}}
{{- $protocol := $x.securityProtocol | default $preset.protocol | default "PLAINTEXT" | upper -}}
{{- $_ := set $out "protocol" $protocol -}}
{{- $_ := set $out "sasl" (hasPrefix "SASL_" $protocol) -}}
{{- $_ := set $out "tls" (or (eq $protocol "SSL") (eq $protocol "SASL_SSL")) -}}
{{- $_ := set $out "mechanism" ($sasl.mechanism | default $preset.mechanism | default "SCRAM-SHA-512") -}}
{{- $_ := set $out "username" ($sasl.username | default $preset.username | default "") -}}
{{- $_ := set $out "passwordSecret" ($sasl.existingSecret | default $preset.passwordSecret | default "") -}}
{{- $_ := set $out "passwordKey" ($sasl.passwordKey | default $preset.passwordKey | default "password") -}}
{{- $_ := set $out "caSecret" ($tls.caSecret | default $preset.caSecret | default "") -}}
{{- $_ := set $out "caKey" ($tls.caKey | default $preset.caKey | default "ca.crt") -}}
{{- $_ := set $out "clientSecret" ($tls.clientSecret | default $preset.clientSecret | default "") -}}
{{- $_ := set $out "certKey" ($tls.certKey | default $preset.certKey | default "tls.crt") -}}
{{- $_ := set $out "keyKey" ($tls.keyKey | default $preset.keyKey | default "tls.key") -}}
{{- $_ := set $out "checkHostname" (ne (toString $tls.checkHostname) "false") -}}
{{- if $out.sasl -}}
{{- if not (and $out.username $out.passwordSecret) -}}
{{- fail (printf "externalKafka.securityProtocol=%s needs externalKafka.sasl.username and externalKafka.sasl.existingSecret (the Secret holding the password, key externalKafka.sasl.passwordKey), or externalKafka.strimzi.{cluster,user}" $protocol) -}}
{{- end -}}
{{- else if or $sasl.username $sasl.existingSecret -}}
{{- fail (printf "externalKafka.sasl.username/existingSecret are set but externalKafka.securityProtocol=%s uses no SASL: set it to SASL_SSL (or SASL_PLAINTEXT)" $protocol) -}}
{{- end -}}
{{- if and (not $out.tls) (or $out.caSecret $out.clientSecret) -}}
{{- fail (printf "externalKafka.tls.caSecret/clientSecret are set but externalKafka.securityProtocol=%s uses no TLS: set it to SSL or SASL_SSL" $protocol) -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* The Secret volumes of the Kafka clients' TLS files (the CA, the client certificate and key), read-only,
mode 0440: "dpe-ingest.kafkaConnection.volumeMounts" in every container that includes env.kafkaConnection,
"dpe-ingest.kafkaConnection.volumes" in its pod.  Nothing when Kafka needs no file. */}}
{{- define "dpe-ingest.kafkaConnection.volumeMounts" -}}
{{- $sec := include "dpe-ingest.kafka.security" . | fromJson -}}
{{- if $sec.caSecret }}
- name: kafka-ca
  mountPath: /etc/dpe-ingest/kafka-ca
  readOnly: true
{{- end }}
{{- if $sec.clientSecret }}
- name: kafka-client-cert
  mountPath: /etc/dpe-ingest/kafka-client
  readOnly: true
{{- end }}
{{- end -}}

{{- define "dpe-ingest.kafkaConnection.volumes" -}}
{{- $sec := include "dpe-ingest.kafka.security" . | fromJson -}}
{{- if $sec.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ $sec.caSecret | quote }}
    defaultMode: 0440
    items:
      - {key: {{ $sec.caKey | quote }}, path: ca.crt}
{{- end }}
{{- if $sec.clientSecret }}
- name: kafka-client-cert
  secret:
    secretName: {{ $sec.clientSecret | quote }}
    defaultMode: 0440
    items:
      - {key: {{ $sec.certKey | quote }}, path: tls.crt}
      - {key: {{ $sec.keyKey | quote }}, path: tls.key}
{{- end }}
{{- end -}}

{{/* The pipeline's topics: JSON list of {name, partitions, config}, as the product creates them
(kafka_io.pipeline_topics, and the producers' slots topic with producer.maxConcurrent); their
replication factor and min.insync.replicas are kafka.topics.  For the Strimzi KafkaTopic resources. */}}
{{- define "dpe-ingest.kafka.topicList" -}}
{{- $v := .Values -}}
{{- $topics := list (dict "name" $v.kafka.topic "partitions" $v.kafka.topicPartitions "config" dict)
    (dict "name" $v.kafka.dlqTopic "partitions" 1 "config" dict)
    (dict "name" $v.producer.checkpointTopic "partitions" 1 "config" (dict "cleanup.policy" "compact")) -}}
{{- if $v.producer.maxConcurrent -}}
{{- $topics = append $topics (dict "name" (printf "%s-slots-%v" $v.producer.checkpointTopic $v.producer.maxConcurrent) "partitions" $v.producer.maxConcurrent "config" dict) -}}
{{- end -}}
{{- if $v.producer.budgetPartitions -}}
{{- $topics = append $topics (dict "name" (printf "%s-budget-%v" $v.producer.checkpointTopic $v.producer.budgetPartitions) "partitions" $v.producer.budgetPartitions "config" dict) -}}
{{- end -}}
{{- toJson $topics -}}
{{- end -}}

{{/* KAFKA_MIN_INSYNC_REPLICAS: kafka.topics.minInsyncReplicas, or (null) 2 when the replication factor is 3
or more, else 0 (the broker's default).  Refuses more than the replication factor. */}}
{{- define "dpe-ingest.kafka.minInsyncReplicas" -}}
{{- $t := .Values.kafka.topics -}}
{{- $rf := int $t.replicationFactor -}}
{{- $n := 0 -}}
{{- if kindIs "invalid" $t.minInsyncReplicas -}}
{{- $n = ternary 2 0 (ge $rf 3) -}}
{{- else -}}
{{- $n = int $t.minInsyncReplicas -}}
{{- end -}}
{{- if gt $n $rf -}}
{{- fail (printf "kafka.topics.minInsyncReplicas=%d is above kafka.topics.replicationFactor=%d: no write with acks=all could ever be acknowledged" $n $rf) -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{- define "dpe-ingest.ademe.url" -}}
{{- if .Values.standin.enabled -}}
{{- printf "http://%s-standin:%v/data-fair/api/v1/datasets/dpe03existant" (include "dpe-ingest.fullname" .) .Values.standin.port -}}
{{- else -}}
{{- required "ademe.apiUrl is empty: give the dataset URL (https://data.ademe.fr/data-fair/api/v1/datasets/dpe03existant) or set standin.enabled=true" .Values.ademe.apiUrl -}}
{{- end -}}
{{- end -}}

{{/* The Secret of the bundled PostgreSQL's password: postgresql.auth.existingSecret, else the chart's own
<release>-postgresql (postgresql/secret.yaml, key "password"). */}}
{{- define "dpe-ingest.postgresql.secretName" -}}
{{- .Values.postgresql.auth.existingSecret | default (printf "%s-postgresql" (include "dpe-ingest.fullname" .)) -}}
{{- end -}}

{{/* How the programs reach PostgreSQL, resolved from postgresql / externalPostgresql (explicit settings,
then the cloudnativepg preset's): JSON {url, env: [{name, value} | {name, secret, key}], sslMode, caSecret,
caKey, clientSecret, certKey, keyKey}.  url is DATABASE_URL; env holds libpq's own variables (PGHOST…:
a value, or a key of a Secret); a password is only ever a Secret's key.  Refuses a half-given setting,
naming it.  Use: include … | fromJson (env.postgresql, postgresql.volumes/volumeMounts). */}}
{{- define "dpe-ingest.postgresql.connection" -}}
{{- $out := dict "caSecret" "" "clientSecret" "" "sslMode" "" -}}
{{- if .Values.postgresql.enabled -}}
{{- $a := .Values.postgresql.auth -}}
{{- $_ := set $out "url" (printf "postgresql://%s@%s-postgresql:5432/%s" $a.username (include "dpe-ingest.fullname" .) $a.database) -}}
{{- $_ := set $out "password" (dict "secret" (include "dpe-ingest.postgresql.secretName" .) "key" (ternary ($a.passwordKey | default "password") "password" (not (empty $a.existingSecret)))) -}}
{{- else -}}
{{- $e := .Values.externalPostgresql -}}
{{- $cnpg := ($e.cloudnativepg | default dict).cluster | default "" -}}
{{- $preset := dict -}}
{{- if $cnpg -}}
{{- $preset = dict "existingSecret" (printf "%s-app" $cnpg) "userKey" "username" "hostKey" "host" "portKey" "port"
    "databaseKey" "dbname" "caSecret" (printf "%s-ca" $cnpg) -}}
{{- end -}}
{{- $secret := $e.existingSecret | default $preset.existingSecret | default "" -}}
{{- $url := $e.url | default "" -}}
{{- if $url -}}
{{- if not (regexMatch "^postgres(ql)?://" $url) -}}
{{- fail (printf "externalPostgresql.url=%q: expected a libpq URL postgresql://user@host:5432/db" $url) -}}
{{- end -}}
{{- if or $cnpg $e.host $e.hostKey -}}
{{- fail "externalPostgresql.url is given together with externalPostgresql.host/hostKey/cloudnativepg: libpq would take the URL's host; give one of them" -}}
{{- end -}}
{{- else -}}
{{- /* libpq: an empty URL takes every setting from PGHOST, PGPORT, PGDATABASE, PGUSER */ -}}
{{- $url = "postgresql://" -}}
{{- range $item := list (list "host" "hostKey") (list "port" "portKey") (list "database" "databaseKey") (list "username" "userKey") -}}
{{- $value := get $e (index $item 0) | default "" | toString -}}
{{- $key := get $e (index $item 1) | default (get $preset (index $item 1)) | default "" -}}
{{- if $value -}}
{{- $_ := set $out (index $item 0) (dict "value" $value) -}}
{{- else if and $key $secret -}}
{{- $_ := set $out (index $item 0) (dict "secret" $secret "key" $key) -}}
{{- else if eq (index $item 0) "host" -}}
{{- fail "postgresql.enabled=false needs externalPostgresql.url (postgresql://user@host:5432/db), externalPostgresql.host (or hostKey with existingSecret) or externalPostgresql.cloudnativepg.cluster" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $_ := set $out "url" $url -}}
{{- if $secret -}}
{{- $_ := set $out "password" (dict "secret" $secret "key" ($e.passwordKey | default "password")) -}}
{{- end -}}
{{- $_ := set $out "caSecret" ($e.caSecret | default $preset.caSecret | default "") -}}
{{- $_ := set $out "caKey" ($e.caKey | default "ca.crt") -}}
{{- $_ := set $out "clientSecret" ($e.clientSecret | default "") -}}
{{- $_ := set $out "certKey" ($e.certKey | default "tls.crt") -}}
{{- $_ := set $out "keyKey" ($e.keyKey | default "tls.key") -}}
{{- $_ := set $out "sslMode" ($e.sslMode | default (ternary "verify-full" "" (not (empty $out.caSecret)))) -}}
{{- if and (has $out.sslMode (list "disable" "allow" "prefer")) $out.caSecret -}}
{{- fail (printf "externalPostgresql.sslMode=%s with a CA (externalPostgresql.caSecret or the cloudnativepg preset): libpq would not check the server's certificate against it; use verify-full (or verify-ca, require)" $out.sslMode) -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* DATABASE_URL (also shown by NOTES). */}}
{{- define "dpe-ingest.postgresql.url" -}}
{{- (include "dpe-ingest.postgresql.connection" . | fromJson).url -}}
{{- end -}}

{{/* The Secret volumes of PostgreSQL's TLS files (the CA, a client certificate and key), read-only, mode
0440 (libpq accepts a key readable by its group when root owns it, as the kubelet's files are):
"dpe-ingest.postgresql.volumeMounts" in every container that includes env.postgresql,
"dpe-ingest.postgresql.volumes" in its pod.  Nothing without TLS files. */}}
{{- define "dpe-ingest.postgresql.volumeMounts" -}}
{{- $c := include "dpe-ingest.postgresql.connection" . | fromJson -}}
{{- if $c.caSecret }}
- name: postgresql-ca
  mountPath: /etc/dpe-ingest/postgresql-ca
  readOnly: true
{{- end }}
{{- if $c.clientSecret }}
- name: postgresql-client-cert
  mountPath: /etc/dpe-ingest/postgresql-client
  readOnly: true
{{- end }}
{{- end -}}

{{- define "dpe-ingest.postgresql.volumes" -}}
{{- $c := include "dpe-ingest.postgresql.connection" . | fromJson -}}
{{- if $c.caSecret }}
- name: postgresql-ca
  secret:
    secretName: {{ $c.caSecret | quote }}
    defaultMode: 0440
    items:
      - {key: {{ $c.caKey | quote }}, path: ca.crt}
{{- end }}
{{- if $c.clientSecret }}
- name: postgresql-client-cert
  secret:
    secretName: {{ $c.clientSecret | quote }}
    defaultMode: 0440
    items:
      - {key: {{ $c.certKey | quote }}, path: tls.crt}
      - {key: {{ $c.keyKey | quote }}, path: tls.key}
{{- end }}
{{- end -}}

{{/* =============================================================================================
Generated settings that must survive upgrades
============================================================================================= */}}

{{/* The database password: the given one; else the one in the Secret already in the cluster;
else a new random one.  Argument: dict given, existing (the looked-up Secret or empty dict). */}}
{{- define "dpe-ingest.postgresql.resolvePassword" -}}
{{- if .given -}}
{{- .given -}}
{{- else if and .existing .existing.data .existing.data.password -}}
{{- .existing.data.password | b64dec -}}
{{- else -}}
{{- randAlphaNum 24 -}}
{{- end -}}
{{- end -}}

{{- define "dpe-ingest.postgresql.password" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "dpe-ingest.postgresql.secretName" .) | default dict -}}
{{- include "dpe-ingest.postgresql.resolvePassword" (dict "given" .Values.postgresql.auth.password "existing" $existing) -}}
{{- end -}}

{{/* KRaft cluster id: kafka.clusterId, else derived from namespace/release: 21 hex digits of a
sha256 (hex digits are base64url characters) + "A", whose low bits are 0, so the 22 characters
decode to exactly 16 bytes, as Kafka's Uuid.fromString wants.  Deterministic: it survives upgrades
and a re-install over the kept volume, and needs no lookup (works with helm template / GitOps). */}}
{{- define "dpe-ingest.kafka.clusterId" -}}
{{- if .Values.kafka.clusterId -}}
{{- $id := toString .Values.kafka.clusterId -}}
{{- if not (regexMatch "^[A-Za-z0-9_][A-Za-z0-9_-]{20}[AQgw]$" $id) -}}
{{- fail (printf "kafka.clusterId=%q is not a Kafka cluster id: 22 base64url characters encoding 16 bytes (generate one with kafka-storage.sh random-uuid)" $id) -}}
{{- end -}}
{{- $id -}}
{{- else -}}
{{- printf "%s%s" (sha256sum (printf "dpe-ingest/%s/%s" .Release.Namespace .Release.Name) | trunc 21) "A" -}}
{{- end -}}
{{- end -}}

{{/* =============================================================================================
Pod building blocks
============================================================================================= */}}

{{/* Common pod spec settings.  Argument: the root context. */}}
{{- define "dpe-ingest.podDefaults" -}}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* podFailurePolicy of the Jobs that run `dpe-ingest produce` (producer Jobs, refresh CronJobs): exit 2 (bad
setting, e.g. department code, a Kafka password or CA) and 3 (the API refused the request) cannot succeed
on a retry: fail the Job at once, from the main container or the wait-for-kafka init container (which
exits 2 on a refused password or certificate).  An evicted or preempted pod does not count against
backoffLimit.  Argument: the names of the pod's containers that run our code. */}}
{{- define "dpe-ingest.produce.podFailurePolicy" -}}
podFailurePolicy:
  rules:
    {{- range . }}
    - action: FailJob
      onExitCodes:
        containerName: {{ . }}
        operator: In
        values: [2, 3]
    {{- end }}
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
{{- end -}}

{{/* The shared API budget of `dpe-ingest produce` (producer Jobs, refresh CronJobs): the ConfigMap
<release>-api-budget (producer/api-budget.yaml) mounted where ADEME_BUDGET_FILE (_env.tpl) reads it.
"dpe-ingest.produce.budgetMount" for volumeMounts, "dpe-ingest.produce.budgetVolume" for volumes. */}}
{{- define "dpe-ingest.produce.budgetMount" -}}
- name: api-budget
  mountPath: /etc/dpe-ingest/budget
  readOnly: true
{{- end -}}

{{- define "dpe-ingest.produce.budgetVolume" -}}
- name: api-budget
  configMap:
    name: {{ printf "%s-api-budget" (include "dpe-ingest.fullname" .) }}
    optional: true
{{- end -}}

{{/* =============================================================================================
Per-component pod settings: every component's values carry the same keys (values.yaml), rendered
by these helpers, never copied per component.
============================================================================================= */}}

{{/* The components with pods of their own -> whether they are rendered (JSON). */}}
{{- define "dpe-ingest.components" -}}
{{- $v := .Values -}}
{{- toJson (dict "kafka" $v.kafka.enabled "postgresql" $v.postgresql.enabled "producer" true
    "refresh" (not (empty $v.refresh.schedule)) "consumer" true "analytics" $v.analytics.enabled
    "standin" $v.standin.enabled "kafdrop" $v.kafdrop.enabled) -}}
{{- end -}}

{{/* The ServiceAccount of a component's pods: serviceAccount.name, else <fullname>-<component> when
serviceAccount.create, else none (the namespace's default; no token is mounted either way).
Argument: dict root, c (the component's values), component. */}}
{{- define "dpe-ingest.serviceAccountName" -}}
{{- $sa := .c.serviceAccount | default dict -}}
{{- if $sa.name -}}
{{- $sa.name -}}
{{- else if $sa.create -}}
{{- printf "%s-%s" (include "dpe-ingest.fullname" .root) .component -}}
{{- else if $sa.annotations -}}
{{- fail (printf "%s.serviceAccount.annotations are put on the ServiceAccount the chart creates: set %s.serviceAccount.create=true (or drop the annotations and name an existing one in %s.serviceAccount.name)" .component .component .component) -}}
{{- end -}}
{{- end -}}

{{/* Pod template annotations (podAnnotations), at the pod template's metadata: nothing when there are
none.  Argument: list (the component's values) (indentation). */}}
{{- define "dpe-ingest.podAnnotations" -}}
{{- with (index . 0).podAnnotations }}
{{- printf "annotations:\n%s" (toYaml . | indent 2) | nindent (index $ 1) }}
{{- end }}
{{- end -}}

{{/* Where a component's pods run and as whom: serviceAccountName, priorityClassName, nodeSelector,
tolerations, affinity, topologySpreadConstraints, at the pod spec's indentation; nothing when none is
set.  Argument: dict root, c (the component's values), component, indent. */}}
{{- define "dpe-ingest.podPlacement" -}}
{{- $c := .c -}}
{{- $out := dict -}}
{{- with include "dpe-ingest.serviceAccountName" . }}{{ $_ := set $out "serviceAccountName" . }}{{ end }}
{{- range $key := list "priorityClassName" "nodeSelector" "tolerations" "affinity" "topologySpreadConstraints" }}
{{- with get $c $key }}{{ $_ := set $out $key . }}{{ end }}
{{- end }}
{{- with $out }}{{ toYaml . | nindent $.indent }}{{ end }}
{{- end -}}

{{/* A list the user adds to one of a component's lists (extraEnv to env, extraVolumeMounts to
volumeMounts, extraVolumes to volumes), at that list's indentation; nothing when it is empty.
Argument: list (the component's values) (the key) (indentation). */}}
{{- define "dpe-ingest.extraItems" -}}
{{- with get (index . 0) (index . 1) }}{{ toYaml . | nindent (index $ 2) }}{{ end -}}
{{- end -}}
