"""What the gateway offers of Triton's KServe v2 API, over HTTP (``/v2``) and gRPC alike: the extensions it
implements (server metadata lists exactly these), and the endpoints it refuses on purpose, with the reason
the client is given. Everything else is either answered by the gateway (health, metadata, config,
inference) or relayed to Triton (statistics, repository index); README.md has the table.
"""

from __future__ import annotations

from app.errors import NotOffered, NotProxied

EXTENSIONS = ("binary_tensor_data", "parameters", "statistics", "model_configuration", "schedule_policy",
              "sequence")  # fmt: skip

_CONTROL = (
    "model control (load/unload) is not exposed through the gateway: a client of the gateway must not "
    "change what every other client is served; use Triton's own endpoint from the operator's network"
)
_SHM = (
    "shared-memory tensors cannot cross the gateway (a network hop between the client and Triton); "
    "send the tensor data in the request"
)
_OPS = (
    "Triton's {} settings are an operator concern the gateway does not proxy; "
    "use Triton's own endpoint from the operator's network"
)


def refusal(feature: str) -> NotOffered:
    """The error a refused endpoint answers: ``model_control``, ``shared_memory``, ``trace``, ``logging``."""
    if feature == "model_control":
        return NotProxied(_CONTROL, {"feature": feature})
    if feature == "shared_memory":
        return NotOffered(_SHM, {"feature": feature})
    return NotProxied(_OPS.format(feature), {"feature": feature})


# gRPC method -> feature (HTTP: the routes in app.frontends.kserve_http.routes refer to the same features).
REFUSED_RPCS = {
    "RepositoryModelLoad": "model_control",
    "RepositoryModelUnload": "model_control",
    "SystemSharedMemoryStatus": "shared_memory",
    "SystemSharedMemoryRegister": "shared_memory",
    "SystemSharedMemoryUnregister": "shared_memory",
    "CudaSharedMemoryStatus": "shared_memory",
    "CudaSharedMemoryRegister": "shared_memory",
    "CudaSharedMemoryUnregister": "shared_memory",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}
