{{/* Chart name, overridable. */}}
{{- define "lorajob.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: <release>-<chart> unless the release name already contains it. */}}
{{- define "lorajob.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lorajob.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lorajob.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorajob.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lorajob.labels" -}}
helm.sh/chart: {{ include "lorajob.chart" . }}
{{ include "lorajob.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: lorajob
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lorajob.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lorajob.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Operator image: digest wins over tag; the tag defaults to the chart's appVersion. */}}
{{- define "lorajob.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Namespace-scoped install: true when watchNamespaces lists namespaces. */}}
{{- define "lorajob.namespaced" -}}
{{- if .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{- define "lorajob.webhookServiceName" -}}
{{- printf "%s-webhook" (include "lorajob.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lorajob.webhookCertSecret" -}}
{{- default (printf "%s-webhook-tls" (include "lorajob.fullname" .)) .Values.webhook.tlsSecretName }}
{{- end }}

{{- define "lorajob.webhookConfigName" -}}
{{- printf "%s.%s" (include "lorajob.fullname" .) "finetune.loraops.dev" | trunc 253 }}
{{- end }}

{{/* URL path of the validating handler: kopf's webhook server routes /<handler id>, and
the handler's id is "lorajob" (lorajob_operator/webhook.py; tests/helm checks it). */}}
{{- define "lorajob.webhookPath" -}}
/lorajob
{{- end }}
