"""``GET /v1/models``: the models live workers serve, in OpenAI's list shape (key required
when auth is on, like every ``/v1`` route)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from gateway.auth import get_principal
from gateway.catalog import WorkerInfo
from gateway.deps import GatewayDep
from shared.errors import ModelNotFoundError

router = APIRouter(tags=["models"], dependencies=[Depends(get_principal)])


def _model_card(name: str, workers: list[WorkerInfo]) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(min(w.started_at for w in workers)),
        "owned_by": "tokenfleet",
        "num_workers": len(workers),
        "num_warm_workers": sum(w.is_warm for w in workers),
    }


@router.get("/v1/models", summary="Models served by live workers")
async def list_models(gw: GatewayDep) -> dict[str, Any]:
    models = await gw.catalog.served_models(fresh=True)
    return {"object": "list",
            "data": [_model_card(name, models[name]) for name in sorted(models)]}


@router.get("/v1/models/{model:path}", summary="One served model")
async def get_model(model: str, gw: GatewayDep) -> dict[str, Any]:
    models = await gw.catalog.served_models(fresh=True)
    if model not in models:
        raise ModelNotFoundError(f"model {model!r} is not served here", param="model")
    return _model_card(model, models[model])
