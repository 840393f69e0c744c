"""Services: model registry, validation, response cache, single-flight and inference."""
