"""The engine loads in a background thread after start-up, so /health answers at once (503 "loading" until
ready, or "error" with the reason the load failed)."""

from __future__ import annotations

import logging
import time

from ..engine import TrainerEngine
from ..errors import NotReady
from ..model_source import ModelSourceError
from ..settings import TrainerSettings

log = logging.getLogger("services.trainer")


class EngineLoader:
    """Holds the engine once the background load finishes (or the reason it failed)."""

    def __init__(self, settings: TrainerSettings):
        self.settings = settings
        self.engine: TrainerEngine | None = None
        self.error: str | None = None
        self.started = time.time()

    def ready(self) -> TrainerEngine:
        """The engine, or NotReady (503) while it loads or after it failed to."""
        if self.engine is None:
            raise NotReady(self.error)
        return self.engine

    def run(self) -> None:
        from ..loading import load_student  # torch and transformers load here, not at import

        try:
            self.engine = TrainerEngine(load_student(self.settings), self.settings)
            log.info("trainer ready in %.1f s", time.time() - self.started)
        except ModelSourceError as exc:
            self.error = str(exc)
            log.error("trainer failed to load: %s", exc)
        except Exception as exc:  # anything else is still reported on /health rather than hanging
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("trainer failed to load")
