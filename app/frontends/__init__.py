"""Front doors other than the FastAPI app (which serves HTTP): the gRPC server."""
