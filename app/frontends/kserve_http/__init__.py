"""``/v2``: KServe v2 over HTTP (``routes``; ``codec``: JSON and binary tensors; ``binary``: the framing)."""
