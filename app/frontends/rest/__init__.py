"""``/v1``: the gateway's JSON API (``routes``: the infer handler and its OpenAPI operations; ``codec``)."""
