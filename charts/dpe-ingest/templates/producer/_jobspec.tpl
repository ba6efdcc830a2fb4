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
    {{- include "dpe-ingest.podAnnotations" (list $p 4) }}
  spec:
    restartPolicy: Never
    {{- include "dpe-ingest.podDefaults" $root | nindent 4 }}
    {{- include "dpe-ingest.podPlacement" (dict "root" $root "c" $p "component" "producer" "indent" 4) }}
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
          - name: api-budget
            mountPath: /etc/dpe-ingest/budget
            readOnly: true
          {{- include "dpe-ingest.extraItems" (list $p "extraVolumeMounts" 10) }}
    volumes:
      - name: tmp
        emptyDir: {}
      - name: api-budget
        configMap:
          name: {{ printf "%s-api-budget" (include "dpe-ingest.fullname" $root) }}
          optional: true
      {{- include "dpe-ingest.extraItems" (list $p "extraVolumes" 6) }}
{{- end -}}
