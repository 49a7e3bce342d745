{{/* Names */}}
{{- define "fanfare.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fanfare.fullname" -}}
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

{{- define "fanfare.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels */}}
{{- define "fanfare.labels" -}}
helm.sh/chart: {{ include "fanfare.chart" . }}
{{ include "fanfare.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fanfare
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "fanfare.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fanfare.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "fanfare.redis.fullname" -}}
{{- printf "%s-redis" (include "fanfare.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fanfare.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fanfare.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "fanfare.redis.labels" -}}
helm.sh/chart: {{ include "fanfare.chart" . }}
{{ include "fanfare.redis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.redis.bundled.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fanfare
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "fanfare.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fanfare.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fanfare.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The Secret holding API key, JWT keys and Redis URLs: chart-created or existing. */}}
{{- define "fanfare.secretName" -}}
{{- default (include "fanfare.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* True when the chart creates a Secret (it has something to put in it). */}}
{{- define "fanfare.createSecret" -}}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.apiKey .Values.secrets.hmacSecret .Values.secrets.hmacPreviousSecret .Values.secrets.publicKeyPem .Values.secrets.webhookSecret) }}true{{- end }}
{{- end }}

{{/*
Milliseconds of a duration string as the configuration writes them ("250ms",
"5s", "2m", "1h"; the schema accepts only these forms).
*/}}
{{- define "fanfare.durationMillis" -}}
{{- $d := toString . }}
{{- if hasSuffix "ms" $d }}
{{- trimSuffix "ms" $d | int64 }}
{{- else if hasSuffix "s" $d }}
{{- mul (trimSuffix "s" $d | int64) 1000 }}
{{- else if hasSuffix "m" $d }}
{{- mul (trimSuffix "m" $d | int64) 60000 }}
{{- else if hasSuffix "h" $d }}
{{- mul (trimSuffix "h" $d | int64) 3600000 }}
{{- else }}
{{- fail (printf "cannot read the duration %q (write e.g. \"5s\")" $d) }}
{{- end }}
{{- end }}

{{/* Whole seconds of a duration, rounded up. */}}
{{- define "fanfare.durationSeconds" -}}
{{- div (add (include "fanfare.durationMillis" . | int64) 999) 1000 }}
{{- end }}

{{/* Seconds from SIGTERM to exit at most: shutdown.drain_delay + drain_period + drain_timeout (fanfare's defaults when unset). */}}
{{- define "fanfare.drainSeconds" -}}
{{- $shutdown := default dict .Values.config.shutdown }}
{{- $delay := include "fanfare.durationSeconds" (default "5s" $shutdown.drain_delay) | int }}
{{- $period := include "fanfare.durationSeconds" (default "10s" $shutdown.drain_period) | int }}
{{- $timeout := include "fanfare.durationSeconds" (default "5s" $shutdown.drain_timeout) | int }}
{{- add $delay $period $timeout }}
{{- end }}

{{- define "fanfare.terminationGracePeriodSeconds" -}}
{{- $needed := add .Values.lifecycle.preStopSleepSeconds (include "fanfare.drainSeconds" . | int) 1 }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed 9 }}
{{- else if lt (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds %v does not cover lifecycle.preStopSleepSeconds + config.shutdown.drain_delay + drain_period + drain_timeout (needs at least %d)" .Values.terminationGracePeriodSeconds $needed) }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Redis URLs the nodes use (unless read from the Secret). */}}
{{- define "fanfare.redisUrls" -}}
{{- if eq .Values.redis.mode "bundled" }}
{{- list (printf "redis://%s:6379" (include "fanfare.redis.fullname" .)) | toJson }}
{{- else }}
{{- .Values.redis.external.urls | toJson }}
{{- end }}
{{- end }}

{{/* The configuration: values.config plus the keys the chart manages. */}}
{{- define "fanfare.effectiveConfig" -}}
{{- $cfg := deepCopy (default dict .Values.config) }}
{{- $http := default dict (get $cfg "http") }}
{{- $_ := set $http "listen" (printf "%s:%d" .Values.bindAddress (int .Values.ports.http)) }}
{{- $tls := default dict .Values.tls }}
{{- if (default dict $tls.http).secretName }}
{{- $_ := set $http "tls_cert" "/etc/fanfare-tls/http/tls.crt" }}
{{- $_ := set $http "tls_key" "/etc/fanfare-tls/http/tls.key" }}
{{- end }}
{{- $_ := set $cfg "http" $http }}
{{- $grpc := default dict (get $cfg "grpc") }}
{{- $_ := set $grpc "listen" (printf "%s:%d" .Values.bindAddress (int .Values.ports.grpc)) }}
{{- if (default dict $tls.grpc).secretName }}
{{- $_ := set $grpc "tls_cert" "/etc/fanfare-tls/grpc/tls.crt" }}
{{- $_ := set $grpc "tls_key" "/etc/fanfare-tls/grpc/tls.key" }}
{{- end }}
{{- $_ := set $cfg "grpc" $grpc }}
{{- $redis := default dict (get $cfg "redis") }}
{{- if eq .Values.redis.mode "none" }}
{{- $_ := set $cfg "broker" (dict "kind" "memory") }}
{{- else }}
{{- $_ := set $cfg "broker" (dict "kind" "redis") }}
{{- if not (and (eq .Values.redis.mode "external") .Values.redis.external.urlsFromSecret) }}
{{- $_ := set $redis "urls" (include "fanfare.redisUrls" . | fromJsonArray) }}
{{- end }}
{{- $_ := set $redis "cluster" (and (eq .Values.redis.mode "external") .Values.redis.external.cluster) }}
{{- with (and (eq .Values.redis.mode "external") .Values.redis.external.tls) }}
{{- if .secretName }}
{{- range $setting, $file := dict "tls_ca" .ca "tls_cert" .cert "tls_key" .key }}
{{- if and $file (not (get $redis $setting)) }}
{{- $_ := set $redis $setting (printf "/etc/fanfare-redis-tls/%s" $file) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "redis" $redis }}
{{- toJson $cfg }}
{{- end }}

{{/* One TOML value: string, bool, number or list of those. */}}
{{- define "fanfare.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) }}
{{- if eq (float64 (int64 .)) (float64 .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "uint64" .) }}{{ . }}
{{- else if kindIs "slice" . }}[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "fanfare.tomlValue" $v }}{{ end }}]
{{- else }}{{ fail (printf "config: cannot write %v (%s) as TOML" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/* fanfare.toml: each section a [table], lists of tables as [[arrays]]. */}}
{{- define "fanfare.toml" -}}
# fanfare.toml rendered by the fanfare Helm chart from values.config.
# Secrets come from the environment (FANFARE__API__KEY, FANFARE__AUTH__HMAC_SECRET, ...).
{{- $cfg := include "fanfare.effectiveConfig" . | fromJson }}
{{- range $section, $body := $cfg }}
{{- if kindIs "map" $body }}

[{{ $section }}]
{{- range $k, $v := $body }}
{{- if not (kindIs "invalid" $v) }}
{{ $k }} = {{ include "fanfare.tomlValue" $v }}
{{- end }}
{{- end }}
{{- else if kindIs "slice" $body }}
{{- range $item := $body }}

[[{{ $section }}]]
{{- range $k, $v := $item }}
{{- if not (kindIs "invalid" $v) }}
{{ $k }} = {{ include "fanfare.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Fails on combinations the schema cannot express. */}}
{{- define "fanfare.validate" -}}
{{- if and (eq .Values.redis.mode "none") (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) }}
{{- fail "redis.mode \"none\" (in-memory broker) serves a single node: set replicaCount 1 and autoscaling.enabled false, or use redis.mode bundled/external" }}
{{- end }}
{{- if and (eq .Values.redis.mode "external") (not .Values.redis.external.urlsFromSecret) (empty .Values.redis.external.urls) }}
{{- fail "redis.mode \"external\" needs redis.external.urls (or redis.external.urlsFromSecret with secrets.existingSecret)" }}
{{- end }}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.urlsFromSecret (not .Values.secrets.existingSecret) }}
{{- fail "redis.external.urlsFromSecret reads the URLs from secrets.existingSecret: set it" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" }}
{{- end }}
{{- if and .Values.httpRoute.enabled (empty .Values.httpRoute.parentRefs) }}
{{- fail "httpRoute.enabled needs httpRoute.parentRefs (the Gateway to attach to)" }}
{{- end }}
{{- if and .Values.admin.enabled (not .Values.admin.existingSecret) }}
{{- fail "admin.enabled needs admin.existingSecret (a Secret with the console's password or password hash and its session secret)" }}
{{- end }}
{{- $webhooks := default dict .Values.config.webhooks }}
{{- if $webhooks.url }}
{{- if and (not .Values.secrets.webhookSecret) (not .Values.secrets.existingSecret) }}
{{- fail "config.webhooks.url needs secrets.webhookSecret (or secrets.existingSecret holding secrets.keys.webhookSecret): receivers verify the signature" }}
{{- end }}
{{- if empty $webhooks.events }}
{{- fail "config.webhooks.url needs config.webhooks.events (the events to send)" }}
{{- end }}
{{- else if not (empty $webhooks.events) }}
{{- fail "config.webhooks.events needs config.webhooks.url" }}
{{- end }}
{{- $client := default dict .Values.config.client }}
{{- if and (hasKey $client "ping_interval") (hasKey $client "pong_timeout") }}
{{- if ge (include "fanfare.durationMillis" $client.pong_timeout | int64) (include "fanfare.durationMillis" $client.ping_interval | int64) }}
{{- fail "config.client.pong_timeout must be shorter than config.client.ping_interval" }}
{{- end }}
{{- end }}
{{- end }}
