"""The trainer's HTTP layer: FastAPI routers over TrainerEngine, with auth, limits and error bodies as
dependencies, middleware and exception handlers. Nothing here runs the model."""

from .app import create_app

__all__ = ["create_app"]
