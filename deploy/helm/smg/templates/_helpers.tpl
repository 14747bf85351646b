{{/* Names, labels and the few facts more than one template needs. */}}

{{- define "smg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's objects' name: the release name, unless it already contains the chart's. */}}
{{- define "smg.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "smg.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable for the release's life (a Deployment's selector is immutable). */}}
{{- define "smg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "smg.labels" -}}
helm.sh/chart: {{ include "smg.chart" . }}
{{ include "smg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: smg
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "smg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "smg.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Where the ConfigMap is mounted; the container runs `smg launch --config <dir>/config.yaml`. */}}
{{- define "smg.configDir" -}}/etc/smg{{- end -}}

{{/* The Secret the pod reads SMG_* keys from ("" when none). */}}
{{- define "smg.secretName" -}}
{{- if .Values.existingSecret -}}
{{- .Values.existingSecret -}}
{{- else if .Values.secretEnv -}}
{{- include "smg.fullname" . -}}
{{- end -}}
{{- end -}}

{{/* shutdown_grace_period_secs as smg reads it: the config's value, else smg's default (180). */}}
{{- define "smg.shutdownGrace" -}}
{{- dig "shutdown_grace_period_secs" 180 .Values.config | int -}}
{{- end -}}

{{- define "smg.terminationGracePeriodSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (include "smg.shutdownGrace" . | int) (int .Values.terminationGracePeriodMarginSeconds) -}}
{{- end -}}

{{/* The service account's token is mounted when set, or when pod discovery needs it. */}}
{{- define "smg.automountToken" -}}
{{- or .Values.serviceAccount.automountServiceAccountToken .Values.discovery.enabled -}}
{{- end -}}

{{/* A label map as smg's selector flags take it: ["key=value", ...] (sorted by key). */}}
{{- define "smg.selectorList" -}}
{{- $items := list -}}
{{- range $k, $v := . -}}
{{- $items = append $items (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- toYaml $items -}}
{{- end -}}

{{/* The namespace pod discovery watches ("" when it watches them all). */}}
{{- define "smg.discoveryNamespace" -}}
{{- if not .Values.discovery.clusterWide -}}
{{- .Values.discovery.namespace | default .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* The config file: values.config, plus the keys discovery.* stands for when enabled. */}}
{{- define "smg.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $d := .Values.discovery -}}
{{- if $d.enabled -}}
{{- $_ := set $config "service_discovery" true -}}
{{- $_ := set $config "service_discovery_port" (int $d.port) -}}
{{- with include "smg.discoveryNamespace" . -}}
{{- $_ := set $config "service_discovery_namespace" . -}}
{{- end -}}
{{- if $d.selector -}}
{{- $_ := set $config "selector" (include "smg.selectorList" $d.selector | fromYamlArray) -}}
{{- end -}}
{{- if $d.prefillSelector -}}
{{- $_ := set $config "prefill_selector" (include "smg.selectorList" $d.prefillSelector | fromYamlArray) -}}
{{- end -}}
{{- if $d.decodeSelector -}}
{{- $_ := set $config "decode_selector" (include "smg.selectorList" $d.decodeSelector | fromYamlArray) -}}
{{- end -}}
{{- if or $d.prefillSelector $d.decodeSelector -}}
{{- $_ := set $config "pd_disaggregation" true -}}
{{- end -}}
{{- with $d.modelIdFrom -}}
{{- $_ := set $config "model_id_from" . -}}
{{- end -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}
