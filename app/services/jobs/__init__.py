"""Asynchronous inference: durable jobs on Redis Streams, WebSocket push, signed webhooks.

``store`` (Redis layout and atomic state changes), ``service`` (submit/get/cancel/stats), ``worker``
(consumer group, reclaim, dead letters), ``events`` (pub/sub fan-out), ``webhooks`` (Standard Webhooks
signing and delivery schedule), ``ssrf`` (webhook URL guard), ``runtime`` (wiring for one process).
"""
