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
{{- $servers := .Values.externalKafka.bootstrapServers | default "" | toString | trim -}}
{{- if not $servers -}}
{{- fail "kafka.enabled=false needs externalKafka.bootstrapServers (host:port[,host:port…] reachable from the pods)" -}}
{{- end -}}
{{- range (splitList "," $servers) -}}
{{- if not (regexMatch "^[^:, ]+:[0-9]+$" (trim .)) -}}
{{- fail (printf "externalKafka.bootstrapServers=%q: expected host:port[,host:port…]" $servers) -}}
{{- end -}}
{{- end -}}
{{- $servers -}}
{{- end -}}
{{- end -}}

{{- define "dpe-ingest.ademe.url" -}}
{{- if .Values.standin.enabled -}}
{{- printf "http://%s-standin:%v/data-fair/api/v1/datasets/dpe03existant" (include "dpe-ingest.fullname" .) .Values.standin.port -}}
{{- else -}}
{{- required "ademe.apiUrl is empty: give the dataset URL (https://data.ademe.fr/data-fair/api/v1/datasets/dpe03existant) or set standin.enabled=true" .Values.ademe.apiUrl -}}
{{- end -}}
{{- end -}}

{{- define "dpe-ingest.postgresql.url" -}}
{{- if .Values.postgresql.enabled -}}
{{- printf "postgresql://%s@%s-postgresql:5432/%s" .Values.postgresql.auth.username (include "dpe-ingest.fullname" .) .Values.postgresql.auth.database -}}
{{- else -}}
{{- $url := .Values.externalPostgresql.url | default "" -}}
{{- if not $url -}}
{{- fail "postgresql.enabled=false needs externalPostgresql.url (postgresql://user@host:5432/db, password in externalPostgresql.existingSecret)" -}}
{{- end -}}
{{- if not (regexMatch "^postgres(ql)?://" $url) -}}
{{- fail (printf "externalPostgresql.url=%q: expected a libpq URL postgresql://user@host:5432/db" $url) -}}
{{- end -}}
{{- $url -}}
{{- end -}}
{{- end -}}

{{/* The Secret of the bundled PostgreSQL's password (key "password"): postgresql/secret.yaml. */}}
{{- define "dpe-ingest.postgresql.secretName" -}}
{{- printf "%s-postgresql" (include "dpe-ingest.fullname" .) -}}
{{- end -}}

{{/* The Secret and key holding the database password: JSON {"name": …, "key": …} or "" (none). */}}
{{- define "dpe-ingest.postgresql.secretRef" -}}
{{- if .Values.postgresql.enabled -}}
{{- toJson (dict "name" (include "dpe-ingest.postgresql.secretName" .) "key" "password") -}}
{{- else if .Values.externalPostgresql.existingSecret -}}
{{- toJson (dict "name" .Values.externalPostgresql.existingSecret "key" (.Values.externalPostgresql.passwordKey | default "password")) -}}
{{- end -}}
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
setting, e.g. department code) and 3 (the API refused the request) cannot succeed on a retry: fail the
Job at once.  An evicted or preempted pod does not count against backoffLimit.  Argument: the container's
name. */}}
{{- define "dpe-ingest.produce.podFailurePolicy" -}}
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        containerName: {{ . }}
        operator: In
        values: [2, 3]
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
