"""The `azt` command line.

azt serve                 run the orchestrator (uvicorn on HOST:PORT from the settings)
azt train [options]       POST /train to a running orchestrator and follow the job with a progress bar
azt eval [options]        POST /eval and print the accuracy table when done
azt jobs | azt job ID     list jobs / show one
azt tree JOB N -o F.svg   save a picture of search tree N of a train job
azt demo                  the whole loop on this machine: trainer + orchestrator, /train, /eval, table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from orchestrator.clients.job_progress import follow_with_bar
from orchestrator.clients.orchestrator import OrchestratorClient
from orchestrator.settings import SearchConfig


def _client(args) -> OrchestratorClient:
    token = os.environ.get("API_TOKEN")
    return OrchestratorClient(args.url, token=token)


def search_value(name: str) -> Callable[[str], Any]:
    """An argparse type for the search knob SearchConfig.<name>: its type and its bounds, so a flag out of
    range fails here with the same limits the API would give a 422 for."""

    def parse(text: str) -> Any:
        try:  # the field's own validation, the other fields at their defaults
            return getattr(SearchConfig.model_validate({name: text}), name)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(exc.errors()[0]["msg"].lower()) from None

    return parse


def add_search_flag(p: argparse.ArgumentParser, name: str, default: Any = None) -> None:
    """--<name> for SearchConfig.<name>, described as there; None (the default) leaves the service's value."""
    description = SearchConfig.model_fields[name].description
    p.add_argument(
        "--" + name.replace("_", "-"),
        type=search_value(name),
        default=default,
        help=f"{description} (default: {'the service setting' if default is None else default})",
    )


TRAIN_SEARCH_FLAGS = (
    "shape",
    "root_samples",
    "iterations",
    "parallel_simulations",
    "n_student",
    "max_tokens",
    "max_depth",
    "chunk_tokens",
)


def _search(args) -> dict[str, Any]:
    fields = {name: getattr(args, name) for name in TRAIN_SEARCH_FLAGS}
    return {k: v for k, v in fields.items() if v is not None}


def cmd_serve(args) -> int:
    import copy

    import uvicorn
    import uvicorn.config

    from orchestrator.api.app import create_app
    from orchestrator.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    # The service's own records (e.g. which GSM8K source a job read) through uvicorn's handler, at its level.
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["orchestrator"] = {
        "handlers": ["default"],
        "level": args.log_level.upper(),
        "propagate": False,
    }
    # Open event streams would hold a graceful shutdown until their jobs end; give them a few seconds only.
    # loop="auto": uvloop (a dependency on Linux and macOS) when it imports, else asyncio's own loop.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="auto",
        log_level=args.log_level,
        log_config=log_config,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=settings.keep_alive_s,
    )
    return 0


def cmd_train(args) -> int:
    request = {
        "num_examples": args.num_examples,
        "offset": args.offset,
        "epochs": args.epochs,
        "checkpoint_every": args.checkpoint_every,
        "search": _search(args),
    }
    for name in ("batch_size", "max_generated_tokens"):  # left out: the recipe's (the service's) default
        if getattr(args, name) is not None:
            request[name] = getattr(args, name)
    if args.eval_every:
        request.update(eval_every=args.eval_every, eval_examples=args.eval_examples)
    with _client(args) as client:
        job_id = client.train(**request)
        print(f"train job {job_id}")
        if args.no_wait:
            return 0
        job = follow_with_bar(client, job_id)
        print(json.dumps({"status": job["status"], "result": job["result"], "error": job["error"]}, indent=2))
        return 0 if job["status"] == "completed" else 1


def cmd_eval(args) -> int:
    from orchestrator.runners.evaluation import accuracy_table

    request = {
        "num_examples": args.num_examples,
        "offset": args.offset,
        "models": args.models,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
    }
    with _client(args) as client:
        job_id = client.eval(**request)
        print(f"eval job {job_id}")
        if args.no_wait:
            return 0
        job = follow_with_bar(client, job_id)
        if job["status"] != "completed":
            print(f"eval {job['status']}: {job['error']}")
            return 1
        print(accuracy_table(job["result"]))
        print(f"per-problem results: {args.url}/jobs/{job_id}/results.jsonl")
        return 0


def cmd_jobs(args) -> int:
    with _client(args) as client:
        for job in client.jobs():
            print(f"{job['id']:<20} {job['kind']:<5} {job['status']:<11} {json.dumps(job['progress'])[:80]}")
    return 0


def cmd_job(args) -> int:
    with _client(args) as client:
        print(json.dumps(client.job(args.job_id), indent=2))
    return 0


def cmd_tree(args) -> int:
    with _client(args) as client:
        svg = client.tree(args.job_id, args.n, format="svg")
    with open(args.output, "w") as fh:
        fh.write(svg)
    print(args.output)
    return 0


def cmd_demo(args) -> int:
    from orchestrator.local.demo import run_demo

    return run_demo(args)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's shape: the product's defaults, smaller, so it takes a few minutes on a CPU."""
    p.add_argument("--workdir", default=None, help="default: runs/demo-<UTC time>")
    p.add_argument(
        "--teacher",
        choices=("reference", "embedded"),
        default="reference",
        help="reference: GSM8K train reference solutions (a stand-in for a 70B-class teacher, started here); "
        "embedded: the trainer's own base model",
    )
    p.add_argument(
        "--train-examples", type=int, default=4, help="GSM8K train problems to search and train on"
    )
    p.add_argument("--batch-size", type=int, default=2, help="problems per GRPO step")
    add_search_flag(p, "root_samples", default=4)
    add_search_flag(p, "iterations", default=2)
    add_search_flag(p, "n_student", default=2)
    add_search_flag(p, "max_tokens", default=160)
    p.add_argument("--eval-examples", type=int, default=24, help="GSM8K test problems for base vs trained")
    p.add_argument("--eval-max-tokens", type=int, default=256)
    p.add_argument("--eval-concurrency", type=int, default=48)
    p.add_argument("--learning-rate", type=float, default=None, help="override the recipe's learning rate")
    p.add_argument("--request-timeout", type=float, default=900.0, help="seconds per LLM request")
    p.add_argument("--port", type=int, default=0, help="orchestrator port (0 = a free one)")
    p.add_argument("--trainer-port", type=int, default=0, help="trainer port (0 = a free one)")
    p.add_argument(
        "--json-out", default=None, help="write the demo's figures here (e.g. bench/results/demo.json)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="azt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    default_url = os.environ.get("AZT_URL", "http://127.0.0.1:8000")

    p = sub.add_parser("serve", help="run the orchestrator service")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="start a train job and follow it")
    p.add_argument("--url", default=default_url)
    p.add_argument("--num-examples", type=int, default=8)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="problems per GRPO step (default: 64)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-examples", type=int, default=10)
    p.add_argument(
        "--max-generated-tokens",
        type=int,
        default=None,
        help="stop after the step at which the job's generated tokens reach this many",
    )
    for name in TRAIN_SEARCH_FLAGS:
        add_search_flag(p, name)
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="start an eval job (base vs student) and print the table")
    p.add_argument("--url", default=default_url)
    p.add_argument("--num-examples", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--models", nargs="+", default=["base", "student"], choices=["base", "student"])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--no-wait", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("jobs", help="list jobs")
    p.add_argument("--url", default=default_url)
    p.set_defaults(func=cmd_jobs)
    p = sub.add_parser("job", help="show one job")
    p.add_argument("job_id")
    p.add_argument("--url", default=default_url)
    p.set_defaults(func=cmd_job)
    p = sub.add_parser("tree", help="save a search tree of a train job as SVG")
    p.add_argument("job_id")
    p.add_argument("n", type=int)
    p.add_argument("-o", "--output", default="tree.svg")
    p.add_argument("--url", default=default_url)
    p.set_defaults(func=cmd_tree)

    p = sub.add_parser(
        "demo", help="run trainer + orchestrator here, train and eval a little, print the table"
    )
    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
