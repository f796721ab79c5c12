"""A scripted OpenAI-compatible HTTP server for deterministic tests, fault injection and benchmarks.

A real HTTP/1.1 server (plain asyncio streams, keep-alive) on 127.0.0.1. It serves
  POST /v1/chat/completions, POST /v1/completions   (OpenAI wire format, n >= 1, logprobs)
  POST /logprobs                                     (the trainer's scoring route, for priors and PRE)
  GET  /v1/models, GET /health
  GET  /admin/stats, POST /admin/reset, POST /admin/config, POST /admin/rules   (test control)
Faults are chosen by rules (matched on path and model, optionally only the first `times` matches) or per
request with the header `x-scripted-mode`:
  ok | error (status, default 500, optional retry_after) | hang (never answers) | drop (closes the connection)
  | malformed (200 with broken JSON) | no_logprobs (answers but omits logprobs)
plus `latency_ms` per rule or for the whole server.

The default script plays a GSM8K solver whose answer is `answer` (default "42") after `answer_depth` steps:
step k of a partial solution is "Step k: ...". A "wrong" teacher prompt, a student choice with an odd index
and
a model named in `wrong_models` end with a wrong answer (answer + 1); with `final_style="sentence"` the last
step is "So in total she has N apples." (a step the terminal rules are unsure of). Without a "\n" stop the
student writes on to the answer (a rollout). A checker prompt ("yes or no") gets the `checker_reply`. POST
/logprobs scores any text with deterministic per-word log-probs (`token_logprobs`). Everything is a pure
function of the request, so results are reproducible. Counters: requests per path and model, in_flight,
max_in_flight, connections; `.log` keeps every request (payload and Authorization header) unless
keep_log=False.

Use in a test:  `with ScriptedServer() as server: server.url` (runs in a background thread), or as a process:
`python -m tests.support.scripted_server --port 0` prints `READY <port>` on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

MODES = ("ok", "error", "hang", "drop", "malformed", "no_logprobs")


@dataclass
class Rule:
    mode: str = "ok"
    path: str | None = None  # e.g. "/v1/chat/completions"; None = any
    model: str | None = None  # None = any
    status: int = 500
    retry_after: float | None = None
    latency_ms: float = 0.0
    times: int | None = None  # apply to the first `times` matches only; None = always

    def matches(self, path: str, model: str | None) -> bool:
        return (
            (self.path is None or self.path == path)
            and (self.model is None or self.model == model)
            and (self.times is None or self.times > 0)
        )


@dataclass
class ServerConfig:
    answer: str = "42"
    answer_depth: int = 3  # the step index (1-based) that carries the "#### N" line
    latency_ms: float = 0.0
    checker_reply: str = "no"
    wrong_models: list[str] = field(default_factory=list)
    step_words: int = 6  # words per non-final step
    keep_log: bool = True  # record every request in .log (off for long benchmarks)
    final_style: str = "line"  # "line": "#### N"; "sentence": "So in total she has N apples." (rules unsure)


def trainer_health(started_at: float) -> dict:
    """A serving trainer's /health answer (services.protocol.HealthResponse)."""
    counters = "requests forward_batches exclusive_jobs max_batch_rows merged_requests admitted_requests"
    return {
        "status": "ok",
        "backend": "scripted",
        "device": "none",
        "model": "scripted",
        "adapter_version": 0,
        "step": 0,
        "queue_depth": 0,
        "batcher": dict.fromkeys(f"{counters} forward_passes".split(), 0),
        "started_at": started_at,
    }


@functools.lru_cache(maxsize=1 << 16)  # the script asks for the same words again and again
def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def token_logprobs(text: str, salt: str = "") -> list[float]:
    """Deterministic per-'token' (whitespace word) log-probs in [-2.0, -0.1]."""
    words = text.split() or [""]
    return [-0.1 - (_h(salt, i, w) % 20) / 10.0 for i, w in enumerate(words)]


class ScriptedServer:
    def __init__(self, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.config = config or ServerConfig()
        self.rules: list[Rule] = []
        self.host, self.port = host, port
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0  # TCP connections accepted (connection reuse shows as few)
        self.requests: dict[str, int] = {}
        self.models: dict[str, int] = {}
        self.log: list[dict] = []  # one entry per request: path, model, n, mode
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._hangs: set[asyncio.Future] = set()
        self._connection_tasks: set[asyncio.Task] = set()
        self.started_at = time.time()  # /health's instance id, as the trainer's

    # --- lifecycle --------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self.port, reuse_address=True, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for fut in list(self._hangs):
            fut.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        # Connections still open (a request sleeping out its latency for a client that is gone): end them
        # here, or closing the loop destroys their pending tasks.
        tasks = list(self._connection_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> ScriptedServer:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self.stop())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="scripted-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("scripted server did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # --- control from the test thread ----------------------------------------------------------------------
    def set_rules(self, rules: list[Rule]) -> None:
        self.rules = list(rules)

    def reset(self) -> None:
        self.rules = []
        self.in_flight = self.max_in_flight = self.connections = 0
        self.requests, self.models, self.log = {}, {}, []

    def stats(self) -> dict:
        return {
            "requests": dict(self.requests),
            "models": dict(self.models),
            "in_flight": self.in_flight,
            "connections": self.connections,
            "max_in_flight": self.max_in_flight,
            "total": sum(self.requests.values()),
        }

    # --- HTTP ---------------------------------------------------------------------------------------------
    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        self._connection_tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                keep = await self._handle(method, target.split("?", 1)[0], headers, body, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._connection_tasks.discard(task)
            writer.close()

    async def _handle(self, method: str, path: str, headers: dict, body: bytes, writer) -> bool:
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            return self._send(writer, 400, {"error": {"message": "body is not JSON"}})
        if path.startswith("/admin/"):
            return self._send(writer, 200, self._admin(path, payload))
        if method == "GET" and path in ("/health", "/v1/models"):
            if path == "/health":
                return self._send(writer, 200, trainer_health(self.started_at))
            return self._send(writer, 200, {"object": "list", "data": [{"id": "student", "object": "model"}]})
        model = payload.get("model") if isinstance(payload, dict) else None
        self.requests[path] = self.requests.get(path, 0) + 1
        if model:
            self.models[model] = self.models.get(model, 0) + 1
        rule = self._rule(path, model, headers.get("x-scripted-mode"))
        if self.config.keep_log:
            self.log.append(
                {
                    "path": path,
                    "model": model,
                    "n": payload.get("n", 1),
                    "mode": rule.mode,
                    "authorization": headers.get("authorization"),
                    "headers": headers,  # lower-cased names
                    "payload": payload,
                }
            )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            delay = (rule.latency_ms or self.config.latency_ms) / 1000.0
            if delay:
                await asyncio.sleep(delay)
            if rule.mode == "hang":
                fut = asyncio.get_running_loop().create_future()
                self._hangs.add(fut)
                try:
                    await fut
                finally:
                    self._hangs.discard(fut)
                return False
            if rule.mode == "drop":
                writer.transport.abort()
                return False
            if rule.mode == "error":
                extra = {"Retry-After": f"{rule.retry_after:g}"} if rule.retry_after is not None else {}
                return self._send(
                    writer, rule.status, {"error": {"message": f"scripted {rule.status}"}}, extra
                )
            if rule.mode == "malformed":
                return self._send_raw(writer, 200, b'{"choices": [{"text": "unterminated')
            result = self._route(path, payload, with_logprobs=rule.mode != "no_logprobs")
            if result is None:
                return self._send(writer, 404, {"error": {"message": f"no route {method} {path}"}})
            return self._send(writer, 200, result)
        finally:
            self.in_flight -= 1

    def _rule(self, path: str, model: str | None, header_mode: str | None) -> Rule:
        if header_mode in MODES:
            return Rule(mode=header_mode)
        for rule in self.rules:
            if rule.matches(path, model):
                if rule.times is not None:
                    rule.times -= 1
                return rule
        return Rule()

    def _admin(self, path: str, payload: dict) -> dict:
        if path == "/admin/reset":
            self.reset()
        elif path == "/admin/rules":
            self.rules = [Rule(**r) for r in payload.get("rules", [])]
        elif path == "/admin/config":
            for k, v in payload.items():
                if hasattr(self.config, k):
                    setattr(self.config, k, v)
        return self.stats()

    @staticmethod
    def _send(writer, status: int, obj: Any, extra_headers: dict | None = None) -> bool:
        return ScriptedServer._send_raw(writer, status, json.dumps(obj).encode(), extra_headers)

    @staticmethod
    def _send_raw(writer, status: int, body: bytes, extra_headers: dict | None = None) -> bool:
        head = [
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: keep-alive",
        ]
        head += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        return True

    # --- the script -----------------------------------------------------------------------------------------
    def _route(self, path: str, payload: dict, with_logprobs: bool) -> dict | None:
        if path == "/v1/chat/completions":
            return self._chat(payload, with_logprobs)
        if path == "/v1/completions":
            return self._completions(payload, with_logprobs)
        if path == "/logprobs":
            return self._logprobs(payload)
        return None

    def _next_step(self, partial: str, wrong: bool, salt: str) -> str:
        cfg = self.config
        done = [ln for ln in partial.split("\n") if ln.strip()]
        k = len(done) + 1
        if k >= cfg.answer_depth:
            value = cfg.answer if not wrong else str(int(float(cfg.answer)) + 1)
            return (
                f"So in total she has {value} apples." if cfg.final_style == "sentence" else f"#### {value}"
            )
        words = " ".join(f"w{_h(salt, k, j) % 97}" for j in range(max(cfg.step_words - 3, 1)))
        return f"Step {k}: {words}{' (wrong)' if wrong else ''}"

    def _continue(self, partial: str, wrong: bool, salt: str, stop) -> str:
        """One step when generation stops at a newline, else the rest of the solution (a rollout)."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if "\n" in stops:
            return self._next_step(partial, wrong, salt)
        lines = []
        while not lines or not (lines[-1].startswith("####") or lines[-1].startswith("So in total")):
            lines.append(self._next_step(partial + "".join(ln + "\n" for ln in lines), wrong, salt))
        return "\n".join(lines)

    def _chat(self, payload: dict, with_logprobs: bool) -> dict:
        messages = payload.get("messages") or []
        model = payload.get("model", "")
        n = int(payload.get("n") or 1)
        user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        choices = []
        if "yes or no" in user.lower():
            texts = [self.config.checker_reply] * n
            wrong_flags = [False] * n
        else:
            if messages and messages[-1].get("role") == "assistant":
                partial = messages[-1].get("content", "")  # the student continuing its own solution
            else:
                partial = _between(user, "<partial>", "</partial>")  # a teacher prompt
            teacher_wrong = "plausible but wrong" in user.lower()
            wrong_flags = [
                teacher_wrong or model in self.config.wrong_models or (not _is_teacher(user) and i % 2 == 1)
                for i in range(n)
            ]
            texts = [
                self._continue(partial, w, f"{model}|{i}|{payload.get('seed')}", payload.get("stop"))
                for i, w in enumerate(wrong_flags)
            ]
        max_tokens = payload.get("max_tokens")
        for i, text in enumerate(texts):
            finish = "stop"
            if max_tokens is not None and len(text.split()) > int(max_tokens):
                text, finish = " ".join(text.split()[: int(max_tokens)]), "length"
            choice = {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
            if payload.get("logprobs") and with_logprobs:
                choice["logprobs"] = {
                    "content": [
                        {"token": t, "logprob": lp, "top_logprobs": []}
                        for t, lp in zip(text.split() or [""], token_logprobs(text, model), strict=False)
                    ]
                }
            choices.append(choice)
        return {
            "id": "chatcmpl-scripted",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": _usage(texts),
            "adapter_version": 0,
        }

    def _completions(self, payload: dict, with_logprobs: bool) -> dict:
        prompt = payload.get("prompt", "")
        prompt = prompt[0] if isinstance(prompt, list) else prompt
        n = int(payload.get("n") or 1)
        model = payload.get("model", "")
        texts = [
            self._next_step(_between(prompt, "<partial>", "</partial>"), i % 2 == 1, f"{model}|{i}")
            for i in range(n)
        ]
        choices = []
        for i, text in enumerate(texts):
            lp = None
            if payload.get("logprobs") is not None and with_logprobs:
                lps = token_logprobs(text, model)
                lp = {"tokens": text.split(), "token_logprobs": lps, "top_logprobs": None, "text_offset": []}
            choices.append({"index": i, "text": text, "finish_reason": "stop", "logprobs": lp})
        return {
            "id": "cmpl-scripted",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": _usage(texts),
            "adapter_version": 0,
        }

    def _logprobs(self, payload: dict) -> dict:
        results = []
        for item in payload.get("items", []):
            lps = token_logprobs(item.get("completion", ""), payload.get("model", "student"))
            results.append(
                {
                    "tokens": item.get("completion", "").split(),
                    "token_logprobs": lps,
                    "sum": sum(lps),
                    "mean": sum(lps) / len(lps),
                    "num_tokens": len(lps),
                }
            )
        return {"adapter_version": 0, "results": results}


def _is_teacher(user: str) -> bool:
    return "<partial>" in user


def _between(text: str, start: str, end: str) -> str:
    if start not in text:
        return ""
    return text.split(start, 1)[1].split(end, 1)[0]


def _usage(texts: list[str]) -> dict:
    completion = sum(len(t.split()) for t in texts)
    return {"prompt_tokens": 0, "completion_tokens": completion, "total_tokens": completion}


def admin(url: str, route: str, payload: dict | None = None) -> dict:
    """Drive a scripted server in another process: admin(url, "rules", {"rules": [...]})."""
    return httpx.post(f"{url}/admin/{route}", json=payload or {}, timeout=10).json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--answer-depth", type=int, default=3)
    args = parser.parse_args(argv)

    async def run() -> None:
        server = ScriptedServer(
            ServerConfig(latency_ms=args.latency_ms, answer_depth=args.answer_depth, keep_log=False),
            port=args.port,
        )
        await server.start()
        print(f"READY {server.port}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
