"""The gRPC front door: ``server`` (Triton's ``GRPCInferenceService`` in front of the services) and
``status`` (the domain errors as gRPC status codes)."""
