"""``tgw bench``: a closed-loop load generator and report writers for the gateway and Triton direct.

Modules: ``stats`` (percentiles, per-level results), ``payloads`` (request bodies per target),
``loadgen`` (generator processes: raw HTTP/1.1 and raw gRPC clients), ``stack`` (embedded Triton, Redis
and the gateway as subprocesses), ``report`` (JSON, CSV, Markdown, PNG), ``runner`` (the whole run).
"""
