"""RemoteCore: the engine core (core.py's interface) as a client of the engine process (engine_process.py), for
TRAINER_ENGINE_PROCESS. The HTTP process keeps its event loop, pydantic, the chat template, tokenizing and
detokenizing (the engine answers generations in ids, as DecodedRows); the model's work crosses one Pipe
(engine_wire.py) to the other process, which has a GIL of its own.

A reader thread takes the engine's messages off the pipe (never the event loop: a read may block): it answers each
request's concurrent Future, which the awaiting handler sees through asyncio.wrap_future, and calls a streamed
request's on_token for its tokens as the engine's decode thread would in process. If the engine process dies,
every request it held fails at once with EngineStopped (503), and so does every later one; `failure` says why.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from .core import GENERATE, EngineCore
from .detokenize import finish_sample
from .engine_process import serve
from .engine_wire import Call, Cancel, LoadFailed, Ready, Reply, Stop, Tokens
from .errors import EngineStopped
from .items import OnToken
from .settings import TrainerSettings

log = logging.getLogger("services.trainer")


@dataclass
class WireTimes:
    """Where the replies' time went, in seconds summed over them (from the stamps of engine_wire's Call and Reply),
    so that the service's own share of a request shows beside the engine's (/health's `service.engine_hops`)."""

    replies: int = 0
    to_engine_s: float = 0.0  # this process wrote the Call -> the engine process read it
    in_engine_s: float = 0.0  # read -> answered by the engine core (its queue wait and decode)
    outbox_s: float = 0.0  # answered -> the Reply written to the pipe by the engine's sender thread
    from_engine_s: float = 0.0  # written -> read here by the reader thread
    to_handler_s: float = 0.0  # read -> the awaiting handler running again on the event loop

    def add(self, call_sent: float, reply: Reply, reply_read: float, resumed: float) -> None:
        self.replies += 1
        self.to_engine_s += reply.read_at - call_sent
        self.in_engine_s += reply.answered_at - reply.read_at
        self.outbox_s += reply.sent_at - reply.answered_at
        self.from_engine_s += reply_read - reply.sent_at
        self.to_handler_s += resumed - reply_read


class EngineLoadFailed(Exception):
    """The engine process could not load the model (or exited while loading); the message is /health's."""


class RemoteCore(EngineCore):
    @classmethod
    def start(cls, settings: TrainerSettings, log_level: int | str = "WARNING") -> RemoteCore:
        """Spawn the engine process and wait until its model is loaded (EngineLoadFailed if it is not). 'spawn',
        never fork: the forking process may hold torch's threads or an event loop."""
        context = multiprocessing.get_context("spawn")
        conn, child_conn = context.Pipe(duplex=True)
        process = context.Process(
            target=serve, args=(child_conn, settings, log_level), name="trainer-engine", daemon=False
        )
        process.start()
        child_conn.close()  # ours closed: the child's end is then the only one, and its exit reads as EOF here
        # Run before multiprocessing's own exit handler (registered earlier, so run later), which joins the child:
        # that join would wait forever while our end of the pipe stays open (the child exits when it closes).
        atexit.register(_stop, process, conn, 0.0)
        try:
            first = conn.recv()
        except (EOFError, OSError):
            process.join(5)
            conn.close()
            raise EngineLoadFailed(f"the engine process {exit_reason(process)} while loading") from None
        ready = first[0] if isinstance(first, list) else first
        if isinstance(ready, LoadFailed):
            conn.send(Stop())
            _stop(process, conn)
            raise EngineLoadFailed(ready.error)
        assert isinstance(ready, Ready), f"the engine process sent {type(ready).__name__} before Ready"
        core = cls(process, conn, ready)
        atexit.register(core.close)  # a graceful Stop first, where the service did not close the core itself
        return core

    def __init__(self, process: BaseProcess, conn: Connection, ready: Ready):
        self.process = process
        self.conn = conn
        self.facts = ready.facts
        self.tokenizer = ready.tokenizer
        self._version = ready.adapter_version
        self._ids = itertools.count()
        # request id -> (its answer, its on_token while it streams); shared with the reader thread under _lock
        self._pending: dict[int, tuple[concurrent.futures.Future, OnToken | None]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        # request id -> its answered Reply and when the reader read it (for self.wire), until its caller resumes
        self._arrived: dict[int, tuple[Reply, float]] = {}
        self.wire = WireTimes()
        self._closing = False
        self.failure: str | None = None
        self._reader = threading.Thread(target=self._read, name="trainer-engine-reader", daemon=True)
        self._reader.start()

    @property
    def adapter_version(self) -> int:
        """The newest adapter version the engine reported (with a reply or a streamed token)."""
        return self._version

    async def _call(self, op: str, payload: Any, rows: int = 1) -> Any:
        on_token = None
        if (
            op == GENERATE and payload[1].on_token is not None
        ):  # the callback stays here; its tokens come back
            model, request = payload
            on_token, payload = request.on_token, (model, replace(request, on_token=None))
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.failure is not None:
                raise EngineStopped(self.failure)
            request_id = next(self._ids)
            self._pending[request_id] = (future, on_token)
        call = Call(request_id, op, payload, rows, stream=on_token is not None, sent_at=time.monotonic())
        self._send(call)
        try:
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the client went away
            self._arrived.pop(request_id, None)
            with self._lock:
                waiting = self._pending.pop(request_id, None) is not None
            if waiting:
                with contextlib.suppress(EngineStopped):
                    self._send(Cancel(request_id))
            raise
        if (arrived := self._arrived.pop(request_id, None)) is not None and op == GENERATE:
            self.wire.add(call.sent_at, arrived[0], arrived[1], time.monotonic())
        if op == GENERATE:  # the engine answers ids (DecodedRows): their text is made here
            decoded, version = result
            request, eos_ids = payload[1], self.facts.eos_ids
            result = ([finish_sample(self.tokenizer, eos_ids, request, row) for row in decoded], version)
        return result

    def hops(self) -> dict[str, float]:
        return asdict(self.wire)

    def _send(self, message: Any) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except (OSError, ValueError) as exc:  # the engine is gone (its end closed), or ours was closed
            self._fail(self.failure or f"it could not be reached ({exc})")
            raise EngineStopped(self.failure or "it could not be reached") from exc

    # ----- the reader thread -----
    def _read(self) -> None:
        while True:
            try:
                messages = self.conn.recv()
            except (EOFError, OSError):
                self.process.join(5)
                self._fail(f"it {exit_reason(self.process)}")
                return
            except (
                Exception
            ) as exc:  # a message that cannot be read: nothing can be trusted to arrive after it
                log.exception("a message from the engine process could not be read")
                self._fail(f"a message from it could not be read: {type(exc).__name__}: {exc}")
                _stop(self.process, self.conn, grace_s=0)
                return
            for message in messages:
                if isinstance(message, Tokens):
                    self._tokens(message)
                elif isinstance(message, Reply):
                    self._answer(message)

    def _tokens(self, message: Tokens) -> None:
        pending = self._pending
        for request_id, sample, token, logprob, top, version in message.events:
            self._version = version
            entry = pending.get(request_id)
            if entry is not None and entry[1] is not None:
                entry[1](sample, token, logprob, top)

    def _answer(self, reply: Reply) -> None:
        read = time.monotonic()
        self._version = reply.adapter_version
        with self._lock:
            entry = self._pending.pop(reply.id, None)
        if entry is None or not entry[0].set_running_or_notify_cancel():
            return  # cancelled: the caller is gone
        if reply.error is not None:
            entry[0].set_exception(reply.error)
        else:
            self._arrived[reply.id] = (reply, read)  # before the answer: its caller may resume at once
            entry[0].set_result(reply.result)

    def _fail(self, reason: str) -> None:
        """The engine can serve no more: every request waiting on it fails now, and every later one at once."""
        with self._lock:
            if self.failure is None:
                self.failure = reason
                if not self._closing:
                    log.error("the engine process stopped: %s", reason)
            pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineStopped(reason))

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(EngineStopped):
            self._send(Stop())
        _stop(self.process, self.conn, grace_s=10.0)


def exit_reason(process: BaseProcess) -> str:
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _stop(process: BaseProcess, conn: Connection, grace_s: float = 5.0) -> None:
    """Let the engine process end (after Stop, or as our end of the pipe closes); kill it if it does not (it
    ignores SIGTERM: engine_process.py says why)."""
    process.join(grace_s)
    conn.close()
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)
