"""The front doors, one package each: ``rest`` (the gateway's ``/v1`` JSON API), ``kserve_http`` (KServe v2
over HTTP, ``/v2``), ``grpc`` (KServe v2 over gRPC), ``ws`` (``/v1/ws`` and a job's socket), ``jobs`` (the
jobs API), ``admin`` (health, model metadata, docs, the keys API). Each holds its routes or servicer, its
codec and its OpenAPI schema; what the HTTP doors share (the request pipeline, error rendering, FastAPI
dependencies, the error schemas) is ``http``, below them. The doors never import one another."""
