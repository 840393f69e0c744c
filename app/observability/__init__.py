"""Logs, metrics and traces: ``logging`` (JSON lines), ``metrics`` (Prometheus), ``tracing``
(OpenTelemetry, when configured) and ``context`` (what a request did, for its log line)."""
