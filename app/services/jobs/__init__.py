"""Asynchronous inference: durable jobs on Redis Streams, WebSocket push, signed webhooks.

``store`` (the only code that talks to Redis about jobs: layout, atomic scripts, streams, the job record
``Job`` and ``JobStatus``), ``service`` (submit/get/cancel/watch/stats, per owner), ``sockets`` (the job
WebSockets and the ``/v1/ws`` multiplexer), ``worker`` (consumer group, reclaim, dead letters),
``events`` (one pub/sub subscription per process, fanned out), ``webhooks`` (Standard Webhooks signing,
delivery schedule, per-host caps), ``ssrf`` (webhook URL guard), ``runtime`` (wiring for one process).
"""
