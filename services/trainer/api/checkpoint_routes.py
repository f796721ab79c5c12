"""/checkpoints: save the adapter and optimizer state, load it back, list and delete what is saved."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path

from services.protocol import (
    CHECKPOINT_NAME,
    CheckpointDeleted,
    CheckpointInfo,
    CheckpointList,
    LoadCheckpointRequest,
    SaveCheckpointRequest,
)

from .dependencies import Loader, require_token
from .errors import GUARDED, WITH_BODY, error_responses

router = APIRouter(dependencies=[Depends(require_token)], responses=error_responses(*GUARDED, 503))


@router.post("/checkpoints", responses=error_responses(*WITH_BODY, 507))
async def save_checkpoint(loader: Loader, req: SaveCheckpointRequest | None = None) -> CheckpointInfo:
    return await loader.ready().save_checkpoint(req.name if req else None)


@router.post("/checkpoints/load", responses=error_responses(*WITH_BODY, 404, 409))
async def load_checkpoint(req: LoadCheckpointRequest, loader: Loader) -> CheckpointInfo:
    return await loader.ready().load_checkpoint(req.name)


@router.get("/checkpoints")
async def list_checkpoints(loader: Loader) -> CheckpointList:
    return loader.ready().list_checkpoints()


@router.delete("/checkpoints/{name}", responses=error_responses(404, 422))
async def delete_checkpoint(
    loader: Loader, name: str = Path(pattern=CHECKPOINT_NAME, max_length=128)
) -> CheckpointDeleted:
    return await loader.ready().delete_checkpoint(name)
