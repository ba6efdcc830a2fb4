{{/* Spec of the producer Job of one department.  Argument: dict root, code, run. */}}
{{- define "dpe-ingest.producer.jobSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $p := $v.producer -}}
backoffLimit: {{ $p.backoffLimit }}
{{- /* this YAML comment is part of the spec hashed into the Job's name: keep it, or every Job is replaced */}}
# Exit 2 (bad setting, e.g. department code) and 3 (the API refused the request) cannot succeed on a
# retry: fail the Job at once.  An evicted or preempted pod does not count against backoffLimit.
{{ include "dpe-ingest.produce.podFailurePolicy" (ternary (list "producer" "wait-for-kafka") (list "producer") $p.waitForKafka) }}
{{- if not (kindIs "invalid" $p.ttlSecondsAfterFinished) }}
ttlSecondsAfterFinished: {{ $p.ttlSecondsAfterFinished }}
{{- end }}
{{- if not (kindIs "invalid" $p.activeDeadlineSeconds) }}
activeDeadlineSeconds: {{ $p.activeDeadlineSeconds }}
{{- end }}
template:
  metadata:
    labels:
      {{- include "dpe-ingest.podLabels" (dict "root" $root "component" "producer") | nindent 6 }}
      dpe-ingest/department: {{ .code | quote }}
      dpe-ingest/run: {{ .run | quote }}
    {{- include "dpe-ingest.podAnnotations" (list $p 4) }}
  spec:
    restartPolicy: Never
    {{- include "dpe-ingest.podDefaults" $root | nindent 4 }}
    {{- include "dpe-ingest.podPlacement" (dict "root" $root "c" $p "component" "producer" "indent" 4) }}
    securityContext:
      {{- toYaml $p.podSecurityContext | nindent 6 }}
    {{- if $p.waitForKafka }}
    initContainers:
      {{- include "dpe-ingest.producer.waitForKafka" $root | nindent 6 }}
    {{- end }}
    containers:
      - name: producer
        image: {{ include "dpe-ingest.image" (dict "root" $root "image" $p.image) }}
        imagePullPolicy: {{ $p.image.pullPolicy }}
        command: ["dpe-ingest", "produce"]
        env:
          {{- include "dpe-ingest.env.produce" (dict "root" $root "code" .code) | nindent 10 }}
          - name: PRODUCER_RESTART
            value: {{ ternary "true" "false" (ne .run "0") | quote }}
          {{- include "dpe-ingest.extraItems" (list $p "extraEnv" 10) }}
        resources:
          {{- toYaml $p.resources | nindent 10 }}
        securityContext:
          {{- toYaml $p.containerSecurityContext | nindent 10 }}
        volumeMounts:
          - name: tmp
            mountPath: /tmp
          {{- include "dpe-ingest.produce.budgetMount" $root | nindent 10 }}
          {{- include "dpe-ingest.kafkaConnection.volumeMounts" $root | nindent 10 }}
          {{- include "dpe-ingest.extraItems" (list $p "extraVolumeMounts" 10) }}
    volumes:
      - name: tmp
        emptyDir: {}
      {{- include "dpe-ingest.produce.budgetVolume" $root | nindent 6 }}
      {{- include "dpe-ingest.kafkaConnection.volumes" $root | nindent 6 }}
      {{- include "dpe-ingest.extraItems" (list $p "extraVolumes" 6) }}
{{- end -}}

{{/* Init container of the producer Jobs: the product's own wait for Kafka (python -m
dpe_ingest.kafka_wait, on kafka_io.wait_for_kafka, the producer's own wait), bounded by KAFKA_WAIT_S
(producer.kafkaWaitSeconds).  It logs the address it waits for and, on giving up, one error line naming
it, and exits 1: the pod fails (Init:Error) instead of waiting in Init:0/1 for ever, and the Job's
backoffLimit counts it.  The chart has no other wait for Kafka (test_chart_one_source.py).  Argument:
the root context. */}}
{{- define "dpe-ingest.producer.waitForKafka" -}}
- name: wait-for-kafka
  image: {{ include "dpe-ingest.image" (dict "root" . "image" .Values.producer.image) }}
  imagePullPolicy: {{ .Values.producer.image.pullPolicy }}
  command: ["python", "-m", "dpe_ingest.kafka_wait"]
  env:
    {{- include "dpe-ingest.env.kafkaConnection" . | nindent 4 }}
    {{- include "dpe-ingest.env.kafkaWait" . | nindent 4 }}
    {{- include "dpe-ingest.env.log" . | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 48Mi}
    limits: {cpu: 200m, memory: 96Mi}
  securityContext:
    {{- toYaml .Values.producer.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- include "dpe-ingest.kafkaConnection.volumeMounts" . | nindent 4 }}
{{- end -}}
