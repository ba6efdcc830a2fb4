{{/* METRICS_PORT of a consumer's container (list root componentValues): when metrics.enabled, or when
its probes are enabled (they are served on the metrics port), with what /livez checks. */}}
{{- define "dpe-ingest.metrics.env" -}}
{{- $root := index . 0 -}}{{- $c := index . 1 -}}
{{- if or $root.Values.metrics.enabled $c.probes.enabled }}
- name: METRICS_PORT
  value: {{ $root.Values.metrics.port | toString | quote }}
{{- end }}
{{- if $c.probes.enabled }}
- name: LIVENESS_STALL_S
  value: {{ $c.probes.stallSeconds | toString | quote }}
- name: BATCH_COMMIT_TIMEOUT_S
  value: {{ $c.probes.batchCommitTimeoutSeconds | toString | quote }}
{{- end }}
{{- end -}}

{{/* The container port named "metrics" (list root componentValues), when metrics.enabled or the probes are. */}}
{{- define "dpe-ingest.metrics.ports" -}}
{{- $root := index . 0 -}}{{- $c := index . 1 -}}
{{- if or $root.Values.metrics.enabled $c.probes.enabled }}
ports:
  - name: metrics
    containerPort: {{ $root.Values.metrics.port }}
    protocol: TCP
{{- end }}
{{- end -}}

{{/* livenessProbe (/livez) and readinessProbe (/readyz) on the metrics port (list root componentValues),
when its probes are enabled: group_consumer.GroupConsumer.live / ready. */}}
{{- define "dpe-ingest.probes" -}}
{{- $c := index . 1 -}}
{{- if $c.probes.enabled }}
livenessProbe:
  httpGet:
    path: /livez
    port: metrics
  {{- toYaml $c.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
  {{- toYaml $c.probes.readiness | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The components that serve /metrics. */}}
{{- define "dpe-ingest.metrics.components" -}}
{{- $c := list "consumer" -}}
{{- if .Values.analytics.enabled }}{{ $c = append $c "analytics" }}{{ end -}}
{{- toJson $c -}}
{{- end -}}
