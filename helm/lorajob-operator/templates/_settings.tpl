{{- /*
Values -> OperatorSettings (operator/lorajob_operator/settings.py), one LORAJOB_* variable
per field. Lists, maps and the policy are JSON. Optional settings are left out when
empty so the operator's own default (None) applies. tests/helm checks that every name
here is a settings field and that the rendered values parse.
*/ -}}
{{- define "lorajob.settingsEnv" -}}
- name: LORAJOB_TRAINER_IMAGE
  value: {{ .Values.trainer.image | quote }}
- name: LORAJOB_IMAGE_PULL_POLICY
  value: {{ .Values.trainer.imagePullPolicy | quote }}
- name: LORAJOB_IMAGE_PULL_SECRETS
  value: {{ .Values.trainer.imagePullSecrets | toJson | quote }}
{{- with .Values.trainer.serviceAccountName }}
- name: LORAJOB_TRAINER_SERVICE_ACCOUNT
  value: {{ . | quote }}
{{- end }}
{{- with .Values.trainer.runtimeClassName }}
- name: LORAJOB_RUNTIME_CLASS_NAME
  value: {{ . | quote }}
{{- end }}
- name: LORAJOB_GPU_RESOURCE_NAME
  value: {{ .Values.trainer.gpuResourceName | quote }}
- name: LORAJOB_GPU_PRODUCT_LABEL
  value: {{ .Values.trainer.gpuProductLabel | quote }}
- name: LORAJOB_DEFAULT_GPU_TOLERATIONS
  value: {{ .Values.trainer.gpuTolerations | toJson | quote }}
- name: LORAJOB_DEFAULT_NODE_SELECTOR
  value: {{ .Values.trainer.nodeSelector | toJson | quote }}
- name: LORAJOB_DEFAULT_CPU
  value: {{ .Values.trainer.defaultCpu | quote }}
- name: LORAJOB_DEFAULT_MEMORY
  value: {{ .Values.trainer.defaultMemory | quote }}
- name: LORAJOB_SCRATCH_SIZE_LIMIT
  value: {{ .Values.trainer.scratchSizeLimit | quote }}
- name: LORAJOB_SHM_SIZE_LIMIT
  value: {{ .Values.trainer.shmSizeLimit | quote }}
{{- with .Values.trainer.cachePvcName }}
- name: LORAJOB_CACHE_PVC_NAME
  value: {{ . | quote }}
{{- end }}
{{- range $name, $_ := .Values.trainer.extraEnv }}
{{- if or (hasPrefix "AWS_" $name) (hasPrefix "LORA_TRAINER_" $name) (hasPrefix "HF_TOKEN" $name) }}
{{- fail (printf "trainer.extraEnv.%s: the operator sets %s itself (credentials only ever come from Secrets by reference); remove it" $name $name) }}
{{- end }}
{{- end }}
- name: LORAJOB_TRAINER_EXTRA_ENV
  value: {{ .Values.trainer.extraEnv | toJson | quote }}
- name: LORAJOB_TERMINATION_GRACE_SECONDS
  value: {{ .Values.trainer.terminationGracePeriodSeconds | quote }}
- name: LORAJOB_PROGRESS_PORT
  value: {{ .Values.trainer.progressPort | quote }}
- name: LORAJOB_PROGRESS_INTERVAL_SECONDS
  value: {{ .Values.progress.intervalSeconds | quote }}
- name: LORAJOB_STATUS_MIN_INTERVAL_SECONDS
  value: {{ .Values.progress.statusMinIntervalSeconds | quote }}
- name: LORAJOB_RETRY_BACKOFF_SECONDS
  value: {{ .Values.retries.backoffSeconds | quote }}
- name: LORAJOB_RETRY_BACKOFF_MAX_SECONDS
  value: {{ .Values.retries.backoffMaxSeconds | quote }}
- name: LORAJOB_WAIT_BACKOFF_SECONDS
  value: {{ .Values.retries.waitSeconds | quote }}
- name: LORAJOB_WAIT_BACKOFF_MAX_SECONDS
  value: {{ .Values.retries.waitMaxSeconds | quote }}
- name: LORAJOB_MAX_DISRUPTIONS
  value: {{ .Values.retries.maxDisruptions | quote }}
- name: LORAJOB_GANG_TIMEOUT_SECONDS
  value: {{ .Values.retries.gangTimeoutSeconds | quote }}
- name: LORAJOB_GANG_RETRY_SECONDS
  value: {{ .Values.retries.gangRetrySeconds | quote }}
{{- with .Values.kueue.defaultQueue }}
- name: LORAJOB_KUEUE_DEFAULT_QUEUE
  value: {{ . | quote }}
{{- end }}
- name: LORAJOB_KUEUE_NAMESPACE_QUEUES
  value: {{ .Values.kueue.namespaceQueues | toJson | quote }}
- name: LORAJOB_NAMESPACES
  value: {{ .Values.watchNamespaces | toJson | quote }}
- name: LORAJOB_API_QPS
  value: {{ .Values.apiClient.qps | quote }}
- name: LORAJOB_API_BURST
  value: {{ .Values.apiClient.burst | quote }}
- name: LORAJOB_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
- name: LORAJOB_HEALTH_PORT
  value: {{ .Values.healthPort | quote }}
- name: LORAJOB_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: LORAJOB_WEBHOOK_ENABLED
  value: {{ .Values.webhook.enabled | quote }}
{{- if .Values.webhook.enabled }}
- name: LORAJOB_WEBHOOK_PORT
  value: {{ .Values.webhook.port | quote }}
- name: LORAJOB_WEBHOOK_HOST
  value: {{ printf "%s.%s.svc" (include "lorajob.webhookServiceName" .) .Release.Namespace | quote }}
- name: LORAJOB_WEBHOOK_CERT_FILE
  value: /etc/lorajob/webhook/tls.crt
- name: LORAJOB_WEBHOOK_KEY_FILE
  value: /etc/lorajob/webhook/tls.key
- name: LORAJOB_WEBHOOK_MANAGED
  value: {{ eq .Values.webhook.configuration "kopf" | quote }}
{{- end }}
- name: LORAJOB_POLICY
  value: {{ .Values.policy | toJson | quote }}
{{- end }}
