"""`python -m services.trainer` / `azt-trainer`: serve the trainer over HTTP with uvicorn.

Settings come from TRAINER_* environment variables; --host/--port/--model-source override them.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys


def main(argv: list[str] | None = None) -> None:
    # Spinning OpenMP threads starve each other when several processes share a few cores (measured on the
    # 2-core CI machine: 3-6x slower decoding); must be set before torch starts its thread pool.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from .api import create_app
    from .settings import TrainerSettings

    parser = argparse.ArgumentParser(prog="azt-trainer", description=__doc__)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--model-source")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in {"host": args.host, "port": args.port, "model_source": args.model_source}.items()
        if v is not None
    }
    settings = TrainerSettings(**overrides)
    # This process's GIL (with TRAINER_ENGINE_PROCESS the engine process sets its own): see the setting.
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    http = http_parser(settings.http_parser)
    logging.getLogger(__name__).info(
        "HTTP parser: %s; event loop: %s; model %s",
        http,
        event_loop(settings.event_loop),
        "in its own process" if settings.engine_process else "in this process",
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_keep_alive=settings.keep_alive_s,
        http=http,
        loop=event_loop(settings.event_loop),
    )


def http_parser(choice: str) -> str:
    """TRAINER_HTTP_PARSER as uvicorn's `http`: "auto" is httptools where it imports (as uvicorn's own auto)."""
    if choice == "auto":
        return "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    return choice


def event_loop(choice: str) -> str:
    """TRAINER_EVENT_LOOP as uvicorn's `loop`: "auto" is uvloop where it imports (as uvicorn's own auto)."""
    if choice == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return choice


if __name__ == "__main__":
    main()
