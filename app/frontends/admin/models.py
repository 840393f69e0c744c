"""``/v1/models``: what Triton serves, with names, versions, state, shapes and datatypes."""

from __future__ import annotations

from fastapi import APIRouter

from app.frontends.http.common import ORJSONResponse
from app.frontends.http.deps import RegistryDep
from app.frontends.http.schemas import MODEL_ERRORS, TRITON_ERRORS, Model, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_class=ORJSONResponse, response_model=ModelList, responses=TRITON_ERRORS)
async def list_models(registry: RegistryDep) -> ORJSONResponse:
    models = []
    for item in await registry.list_models():
        entry = dict(item)
        if item["state"] == "READY":
            info = await registry.resolve(item["name"])
            entry.update({k: v for k, v in info.public(item["state"]).items() if k not in entry})
        models.append(entry)
    return ORJSONResponse({"models": models})


@router.get("/{model}", response_class=ORJSONResponse, response_model=Model, responses=MODEL_ERRORS)
async def get_model(model: str, registry: RegistryDep) -> ORJSONResponse:
    info = await registry.resolve(model)
    return ORJSONResponse(info.public())


@router.get(
    "/{model}/versions/{version}", response_class=ORJSONResponse, response_model=Model, responses=MODEL_ERRORS
)
async def get_model_version(model: str, version: str, registry: RegistryDep) -> ORJSONResponse:
    info = await registry.resolve(model, version)
    return ORJSONResponse(info.public())
