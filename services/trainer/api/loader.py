"""The engine loads in a background thread after start-up, so /health answers at once (503 "loading" until
ready, or "error" with the reason the load failed). With TRAINER_ENGINE_PROCESS the model loads in the engine
process (remote_core.py) and this process waits for it; otherwise here."""

from __future__ import annotations

import logging
import time

from ..core import EngineCore
from ..engine import TrainerEngine
from ..errors import NotReady
from ..gc_pauses import freeze_heap
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
        """The engine, or NotReady (503) while it loads or after it failed to. (An engine process that died
        later answers EngineStopped, 503, from the core.)"""
        if self.engine is None:
            raise NotReady(self.error)
        return self.engine

    def failure(self) -> str | None:
        """Why the trainer cannot serve: its load failed, or its engine process stopped; None while it can (or
        is still loading)."""
        if self.engine is not None and self.engine.core.failure is not None:
            return f"the engine process stopped: {self.engine.core.failure}"
        return self.error

    def run(self) -> None:
        from ..engine_process import describe_load_failure
        from ..model_source import ModelSourceError
        from ..remote_core import EngineLoadFailed

        try:
            self.engine = TrainerEngine(self._start_core(), self.settings)
            if self.settings.freeze_gc:  # this process's heap (with the model too where it runs here)
                log.info("froze %d objects of the service's heap", freeze_heap())
            log.info("trainer ready in %.1f s", time.time() - self.started)
        except (ModelSourceError, EngineLoadFailed) as exc:  # described where it happened
            self.error = describe_load_failure(exc) if isinstance(exc, ModelSourceError) else str(exc)
            log.error("trainer failed to load: %s", self.error)
        except Exception as exc:  # anything else is still reported on /health rather than hanging
            self.error = describe_load_failure(exc)
            log.exception("trainer failed to load")

    def _start_core(self) -> EngineCore:
        if self.settings.engine_process:
            from ..remote_core import RemoteCore

            return RemoteCore.start(self.settings, log_level=logging.getLogger().getEffectiveLevel())
        from ..core import LocalCore
        from ..loading import load_student  # torch and transformers load here, not at import

        return LocalCore(load_student(self.settings), self.settings)
