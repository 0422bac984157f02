"""``GET /v1/models``: the models live workers serve, in OpenAI's list shape (key required
when auth is on, like every ``/v1`` route), with each model's limits and the sampling
defaults a request gets for the fields it leaves unset."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from gateway.auth import get_principal
from gateway.catalog import WorkerInfo
from gateway.deps import GatewayDep
from gateway.state import GatewayState
from gateway.validate import usable_sampling_defaults
from shared.errors import ModelNotFoundError, ServiceUnavailableError
from shared.model_info import ModelInfo
from shared.protocol import SamplingParams

_BASE = SamplingParams()
# What a request that sets none of them gets when the model publishes no defaults.
PROTOCOL_DEFAULTS: dict[str, float | int] = {
    "temperature": _BASE.temperature, "top_p": _BASE.top_p, "top_k": _BASE.top_k}

router = APIRouter(tags=["models"], dependencies=[Depends(get_principal)])


def _model_card(name: str, workers: list[WorkerInfo],
                info: ModelInfo | None) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": int(min(w.started_at for w in workers)),
        "owned_by": "tokenfleet",
        "num_workers": len(workers),
        "num_warm_workers": sum(w.is_warm for w in workers),
    }
    if info is not None:  # None: the worker has not published its model info yet
        card["max_context"] = info.max_context
        card["max_batch_tokens"] = info.max_batch_tokens or None
        card["sampling_defaults"] = {**PROTOCOL_DEFAULTS,
                                     **usable_sampling_defaults(info.generation_defaults)}
    return card


async def _info(gw: GatewayState, name: str) -> ModelInfo | None:
    try:
        return (await gw.catalog.model(name)).info
    except ServiceUnavailableError:
        return None


@router.get("/v1/models", summary="Models served by live workers")
async def list_models(gw: GatewayDep) -> dict[str, Any]:
    models = await gw.catalog.served_models(fresh=True)
    return {"object": "list",
            "data": [_model_card(name, models[name], await _info(gw, name))
                     for name in sorted(models)]}


@router.get("/v1/models/{model:path}", summary="One served model")
async def get_model(model: str, gw: GatewayDep) -> dict[str, Any]:
    models = await gw.catalog.served_models(fresh=True)
    if model not in models:
        raise ModelNotFoundError(f"model {model!r} is not served here", param="model")
    return _model_card(model, models[model], await _info(gw, model))
