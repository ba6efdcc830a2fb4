{{/* Spec of the producer Job of one department.  Argument: dict root, code, run. */}}
{{- define "dpe-ingest.producer.jobSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $p := $v.producer -}}
backoffLimit: {{ $p.backoffLimit }}
# Exit 2 (bad setting, e.g. department code) and 3 (the API refused the request) cannot succeed on a
# retry: fail the Job at once.  An evicted or preempted pod does not count against backoffLimit.
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        containerName: producer
        operator: In
        values: [2, 3]
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
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
  spec:
    restartPolicy: Never
    {{- include "dpe-ingest.podDefaults" $root | nindent 4 }}
    securityContext:
      {{- toYaml $p.podSecurityContext | nindent 6 }}
    {{- if $p.waitForKafka }}
    initContainers:
      {{- include "dpe-ingest.waitForKafka" $root | nindent 6 }}
    {{- end }}
    containers:
      - name: producer
        image: {{ include "dpe-ingest.image" (dict "root" $root "image" $p.image) }}
        imagePullPolicy: {{ $p.image.pullPolicy }}
        command: ["dpe-ingest", "produce"]
        env:
          - name: DEPARTMENT
            value: {{ .code | quote }}
          - name: ADEME_API_URL
            value: {{ include "dpe-ingest.ademe.url" $root | quote }}
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
            value: {{ $p.checkpointTopic | quote }}
          - name: PRODUCER_RESTART
            value: {{ ternary "true" "false" (ne .run "0") | quote }}
          {{- if $p.maxConcurrent }}
          - name: PRODUCER_MAX_CONCURRENT
            value: {{ $p.maxConcurrent | toString | quote }}
          {{- end }}
          {{- with $v.metrics.pushgatewayUrl }}
          - name: METRICS_PUSHGATEWAY_URL
            value: {{ . | quote }}
          {{- end }}
          {{- include "dpe-ingest.env.kafka" $root | nindent 10 }}
        resources:
          {{- toYaml $p.resources | nindent 10 }}
        securityContext:
          {{- toYaml $p.containerSecurityContext | nindent 10 }}
        volumeMounts:
          - name: tmp
            mountPath: /tmp
          - name: api-budget
            mountPath: /etc/dpe-ingest/budget
            readOnly: true
    volumes:
      - name: tmp
        emptyDir: {}
      - name: api-budget
        configMap:
          name: {{ printf "%s-api-budget" (include "dpe-ingest.fullname" $root) }}
          optional: true
    {{- with $p.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $p.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end -}}
