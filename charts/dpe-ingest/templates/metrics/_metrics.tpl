{{/* METRICS_PORT of a component's container, when metrics.enabled. */}}
{{- define "dpe-ingest.metrics.env" -}}
{{- if .Values.metrics.enabled }}
- name: METRICS_PORT
  value: {{ .Values.metrics.port | toString | quote }}
{{- end }}
{{- end -}}

{{/* The container port named "metrics", when metrics.enabled. */}}
{{- define "dpe-ingest.metrics.ports" -}}
{{- if .Values.metrics.enabled }}
ports:
  - name: metrics
    containerPort: {{ .Values.metrics.port }}
    protocol: TCP
{{- end }}
{{- end -}}

{{/* The components that serve /metrics. */}}
{{- define "dpe-ingest.metrics.components" -}}
{{- $c := list "consumer" -}}
{{- if .Values.analytics.enabled }}{{ $c = append $c "analytics" }}{{ end -}}
{{- toJson $c -}}
{{- end -}}
