"""Operations routes: health (``/healthz``, ``/readyz``), model metadata (``/v1/models``), docs, keys."""
