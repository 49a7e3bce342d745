{{/*
Alert rules (Prometheus rule groups). Used by the PrometheusRule and, through
scripts/render-k8s.sh, written to deploy/prometheus/fanfare-alerts.yml for a
Prometheus without the Operator. Series are selected by job, which the
ServiceMonitor sets to the client Service's name.
*/}}
{{- define "fanfare.alertGroups" -}}
{{- $r := .Values.metrics.prometheusRule }}
{{- $sel := printf "job=%q" (include "fanfare.fullname" .) }}
groups:
  - name: fanfare
    rules:
      - alert: FanfareNodeNotReady
        expr: max by (namespace, pod, instance) (fanfare_node_ready{ {{- $sel -}} }) == 0
        for: {{ $r.notReadyFor }}
        labels:
          severity: warning
        annotations:
          summary: "fanfare node {{ "{{" }} $labels.instance {{ "}}" }} is not ready"
          description: >-
            /ready has answered 503 for {{ $r.notReadyFor }}: the node is draining or
            cannot reach Redis, and load balancers send it no new clients.
      - alert: FanfareNodeDown
        expr: up{ {{- $sel -}} } == 0
        for: 5m
        labels:
          severity: critical
        annotations:
          summary: "fanfare node {{ "{{" }} $labels.instance {{ "}}" }} cannot be scraped"
          description: The /metrics endpoint has not answered for 5 minutes.
      - alert: FanfareBrokerReconnects
        expr: increase(fanfare_broker_reconnects_total{ {{- $sel -}} }[10m]) >= {{ $r.brokerReconnectsThreshold }}
        labels:
          severity: warning
        annotations:
          summary: "fanfare node {{ "{{" }} $labels.instance {{ "}}" }} keeps reconnecting to Redis"
          description: >-
            {{ "{{" }} $value | humanize {{ "}}" }} broker reconnects in 10 minutes. Each one
            makes the node's subscribers resubscribe (and recover) their channels.
      - alert: FanfareSlowConsumers
        expr: sum by (namespace) (rate(fanfare_slow_consumer_disconnects_total{ {{- $sel -}} }[5m])) > {{ $r.slowConsumerRate }}
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: fanfare is disconnecting slow consumers
          description: >-
            {{ "{{" }} $value | humanize {{ "}}" }} clients per second are closed with 3008 because
            their outbound queue overflowed (client.queue_max_size): clients cannot keep up
            with the publication rate, or nodes are CPU-starved.
      - alert: FanfareApiErrors
        expr: sum by (namespace) (rate(fanfare_api_requests_total{ {{- $sel -}} ,code!="OK"}[5m])) / sum by (namespace) (rate(fanfare_api_requests_total{ {{- $sel -}} }[5m])) > {{ $r.apiErrorRatio }}
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: fanfare control API errors
          description: >-
            {{ "{{" }} $value | humanizePercentage {{ "}}" }} of control API requests fail
            (see fanfare_api_requests_total by method and code).
      - alert: FanfareClusterPartitioned
        expr: min(fanfare_cluster_nodes{ {{- $sel -}} }) < count(fanfare_node_ready{ {{- $sel -}} } == 1)
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: fanfare nodes do not all see each other
          description: >-
            A node counts fewer live nodes than are ready: nodes are using different
            Redis servers or prefixes, and cluster-wide API calls miss some nodes.
      {{- with $r.extraRules }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
{{- end }}
