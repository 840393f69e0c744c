"""Protocol codecs: each front door's wire format <-> the one ``InferRequest`` / ``InferResponse``.

``v1`` (the gateway's JSON API) and ``v2`` (KServe v2 / Triton HTTP) have the same two functions,
``decode(...) -> request`` and ``encode(response, ...) -> Reply``; ``binary`` is the KServe binary-tensor
framing, shared with the Triton HTTP client (``app.clients.triton_http``)."""
