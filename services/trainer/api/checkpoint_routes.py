"""/checkpoints: save the adapter and optimizer state, load it back, list what is saved."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.protocol import CheckpointInfo, CheckpointList, LoadCheckpointRequest, SaveCheckpointRequest

from .dependencies import Loader, require_token

router = APIRouter(dependencies=[Depends(require_token)])


@router.post("/checkpoints")
async def save_checkpoint(loader: Loader, req: SaveCheckpointRequest | None = None) -> CheckpointInfo:
    return await loader.ready().save_checkpoint(req.name if req else None)


@router.post("/checkpoints/load")
async def load_checkpoint(req: LoadCheckpointRequest, loader: Loader) -> CheckpointInfo:
    return await loader.ready().load_checkpoint(req.name)


@router.get("/checkpoints")
async def list_checkpoints(loader: Loader) -> CheckpointList:
    return loader.ready().list_checkpoints()
