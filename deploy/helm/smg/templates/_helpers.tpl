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
