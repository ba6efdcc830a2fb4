{{/* =============================================================================================
NetworkPolicies (networkPolicy.*; docs/chart.md "Network policies").  Each server of the chart has its
own policy in its directory (kafka/, postgresql/, kafdrop/, standin/, metrics/): ingress only, to its
port, from the pods of THIS release that need it (same namespace, selected by the labels the pod
templates render: app.kubernetes.io/name, /instance, /component) plus the peers the user adds.  No
policy has an egress section: the producers keep their way to the ADEME API, every pod its DNS.
============================================================================================= */}}

{{/* The peers allowed in: one podSelector for the release's pods of the given components (a peer with
no namespaceSelector is the policy's own namespace, the release's), then the user's extra peers.
Argument: dict root, components (list), extra (list of NetworkPolicyPeers). */}}
{{- define "dpe-ingest.networkPolicy.from" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/name: {{ .root.Chart.Name }}
      app.kubernetes.io/instance: {{ .root.Release.Name }}
    matchExpressions:
      - key: app.kubernetes.io/component
        operator: In
        values:
          {{- toYaml .components | nindent 10 }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A list of peers set by the user where an empty list has no safe meaning (in a NetworkPolicy an
empty `from` lets everyone in): refused with a sentence.  Argument: dict value, what, hint. */}}
{{- define "dpe-ingest.networkPolicy.peers" -}}
{{- if not .value -}}
{{- fail (printf "%s is empty: list at least one NetworkPolicyPeer (podSelector / namespaceSelector / ipBlock); %s" .what .hint) -}}
{{- end -}}
{{- toYaml .value -}}
{{- end -}}

{{/* Metadata and podSelector of a policy on the pods of one component.  Argument: dict root, name
(suffix of the object name), component, components (the selected ones; default: component). */}}
{{- define "dpe-ingest.networkPolicy.head" -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "dpe-ingest.fullname" .root }}-{{ .name }}
  labels:
    {{- include "dpe-ingest.labels" (dict "root" .root "component" .component) | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      app.kubernetes.io/name: {{ .root.Chart.Name }}
      app.kubernetes.io/instance: {{ .root.Release.Name }}
    {{- if .components }}
    matchExpressions:
      - key: app.kubernetes.io/component
        operator: In
        values:
          {{- toYaml .components | nindent 10 }}
    {{- else }}
      app.kubernetes.io/component: {{ .component }}
    {{- end }}
  policyTypes:
    - Ingress
{{- end -}}
