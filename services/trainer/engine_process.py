"""The engine process (TRAINER_ENGINE_PROCESS): the Student and its Batcher (core.LocalCore) in a process of their
own, started by remote_core.RemoteCore with the 'spawn' method, serving the HTTP process over one Pipe
(engine_wire.py). Its own GIL is shared only by the decode thread, a reader thread (requests in) and a sender
thread (tokens and replies out); the HTTP event loop runs in the other process, as in vLLM's EngineCore.

The sender takes everything that is ready and sends it as one list: the tokens of a decode step's streams and
the replies of the requests it finished go out in one write. When the HTTP process goes away (its end of the
pipe closes: stopped, crashed or killed), this process exits at once: it never outlives the service. It ignores
SIGINT and SIGTERM, which reach it with its service's whole process group (Ctrl-C in a terminal, a process manager
stopping the group): the service shuts down in order and then stops it; SIGKILL still ends it.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from .core import GENERATE, LocalCore
from .engine_wire import Call, Cancel, LoadFailed, Ready, Reply, Stop, Tokens
from .gc_pauses import freeze_heap
from .model_source import ModelSourceError
from .settings import TrainerSettings

log = logging.getLogger("services.trainer.engine")


def describe_load_failure(exc: BaseException) -> str:
    """What /health says when the model failed to load."""
    return str(exc) if isinstance(exc, ModelSourceError) else f"{type(exc).__name__}: {exc}"


def serve(conn: Connection, settings: TrainerSettings, log_level: int | str = "WARNING") -> None:
    """The spawned process's target: load the model, then answer calls until Stop or the pipe closes."""
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    # Here the decode thread competes only with this process's reader and sender threads for the GIL.
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    EngineServer(conn, settings).run()


class EngineServer:
    def __init__(self, conn: Connection, settings: TrainerSettings):
        self.conn = conn
        self.settings = settings
        self.core: LocalCore | None = None
        self.outbox: queue.Queue[Any] = queue.Queue()  # messages and TokenEvents, in the order they happened
        self.running: dict[int, Any] = {}  # request id -> the core's future, for Cancel
        self.read_at: dict[int, float] = {}  # request id -> when its Call was read (a Reply's stamps)
        self.stopped = threading.Event()

    def run(self) -> None:
        # The reader starts before the model loads, so a front end that goes away while it loads ends this too.
        threading.Thread(target=self._read, name="engine-reader", daemon=True).start()
        threading.Thread(target=self._send_all, name="engine-sender", daemon=True).start()
        try:
            from .loading import load_student  # torch and transformers load here, in this process only

            # Generation answers ids: the front end detokenizes, off this process's decode thread.
            core = LocalCore(load_student(self.settings), self.settings, detokenize=False)
        except Exception as exc:  # reported on /health by the front end, as an in-process load failure is
            log.exception("the engine failed to load")
            self.outbox.put(LoadFailed(describe_load_failure(exc)))
            self.stopped.wait()
            return
        self.core = core
        if self.settings.freeze_gc:
            log.info("froze %d objects of the engine process's heap", freeze_heap())
        self.outbox.put(
            Ready(facts=core.facts, tokenizer=core.tokenizer, adapter_version=core.adapter_version)
        )
        self.stopped.wait()
        core.close()

    # ----- requests in -----
    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the front end is gone: nothing is left to serve
                os._exit(0)
            if isinstance(message, Call):
                self.read_at[message.id] = time.monotonic()
                self._call(message)
            elif isinstance(message, Cancel):
                if (future := self.running.get(message.id)) is not None:
                    future.cancel()
            elif isinstance(message, Stop):
                self.stopped.set()
                return

    def _call(self, call: Call) -> None:
        core = self.core
        assert core is not None, "the front end calls only after Ready"
        payload = call.payload
        if call.op == GENERATE and call.stream:
            model, request = payload
            payload = (model, replace(request, on_token=self._on_token(call.id)))
        try:
            future = core.submit(call.op, payload, call.rows)
        except Exception as exc:
            self._put_reply(call.id, error=exc)
            return
        self.running[call.id] = future
        future.add_done_callback(lambda done: self._reply(call.id, done))

    def _on_token(self, request_id: int):
        student = self.core.student if self.core is not None else None
        put = self.outbox.put

        def on_token(sample: int, token: int, logprob: float | None, top: Any) -> None:  # the decode thread
            put((request_id, sample, token, logprob, top, student.adapter_version if student else 0))

        return on_token

    def _reply(self, request_id: int, done: Any) -> None:
        self.running.pop(request_id, None)
        if done.cancelled():
            self.read_at.pop(request_id, None)
            return  # the front end gave up on it and expects nothing
        error = done.exception()
        if error is not None:
            self._put_reply(request_id, error=error)
        else:
            self._put_reply(request_id, result=done.result())

    def _put_reply(self, request_id: int, result: Any = None, error: BaseException | None = None) -> None:
        version = self.core.adapter_version if self.core is not None else 0
        reply = Reply(request_id, version, result=result, error=portable(error))
        reply.read_at, reply.answered_at = self.read_at.pop(request_id, 0.0), time.monotonic()
        self.outbox.put(reply)

    # ----- tokens and replies out -----
    def _send_all(self) -> None:
        while True:
            ready = [self.outbox.get()]
            while True:
                try:
                    ready.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self._send(batched(ready))
            except (EOFError, OSError):
                os._exit(0)

    def _send(self, messages: list[Any]) -> None:
        now = time.monotonic()
        for message in messages:
            if isinstance(message, Reply):
                message.sent_at = now
        try:
            self.conn.send(messages)
        except (pickle.PicklingError, TypeError, AttributeError):
            # Something in one reply does not pickle: send the others, and that request an error it can report.
            for message in messages:
                try:
                    self.conn.send([message])
                except (pickle.PicklingError, TypeError, AttributeError) as exc:
                    if isinstance(message, Reply):
                        failed = RuntimeError(f"the engine's answer could not be sent: {exc}")
                        self.conn.send([Reply(message.id, message.adapter_version, error=failed)])


def batched(ready: list[Any]) -> list[Any]:
    """Runs of TokenEvents become one Tokens message each; the order of everything else is kept."""
    messages: list[Any] = []
    for item in ready:
        if isinstance(item, tuple):
            if messages and isinstance(messages[-1], Tokens):
                messages[-1].events.append(item)
            else:
                messages.append(Tokens([item]))
        else:
            messages.append(item)
    return messages


def portable(error: BaseException | None) -> BaseException | None:
    """The error as it can cross to the front end: itself when it pickles (every TrainerError does, with its
    fields), else a RuntimeError naming its type and message. Checked both ways: an exception whose __init__
    takes other arguments than its args pickles but fails to unpickle, in the other process's reader."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
