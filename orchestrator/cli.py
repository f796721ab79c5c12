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
from typing import Any

from tqdm import tqdm

from orchestrator.client import OrchestratorClient


def follow_with_bar(client: OrchestratorClient, job_id: str, quiet: bool = False) -> dict:
    """Follow a job's events with a tqdm bar (train steps or eval answers); return the job."""
    bar: tqdm | None = None
    try:
        for event in client.follow(job_id):
            data = event.data
            if quiet:
                continue
            if event.type == "progress" and data.get("total_steps") and bar is None:
                bar = tqdm(
                    total=data["total_steps"],
                    initial=data.get("step", 0),
                    unit="step",
                    desc=f"train {job_id}",
                    dynamic_ncols=True,
                )
            elif event.type == "progress" and data.get("phase") == "answering" and bar is None:
                bar = tqdm(total=data["total"], unit="answer", desc=f"eval {job_id}", dynamic_ncols=True)
            elif event.type == "step" and bar is not None:
                bar.update(1)
                reward = data.get("mean_reward")
                bar.set_postfix(
                    reward=f"{reward:.3f}" if reward is not None else "-",
                    correct=f"{data.get('correct_leaf_share') or 0:.2f}",
                    kl=f"{data['kl']:.4f}" if data.get("kl") is not None else "-",
                )
            elif event.type == "tree" and bar is not None:
                bar.set_description(f"train {job_id} (tree {data['n']})")
            elif event.type == "answer" and bar is not None:
                bar.update(1)
            elif event.type == "status" and data["status"] in ("failed", "cancelled", "interrupted"):
                tqdm.write(
                    f"job {job_id} {data['status']}" + (f": {data['error']}" if data.get("error") else "")
                )
    finally:
        if bar is not None:
            bar.close()
    return client.job(job_id)


def _client(args) -> OrchestratorClient:
    token = os.environ.get("API_TOKEN")
    return OrchestratorClient(args.url, token=token)


def _search(args) -> dict[str, Any]:
    fields = {
        "max_depth": args.max_depth,
        "iterations": args.iterations,
        "max_tokens": args.max_tokens,
        "chunk_tokens": args.chunk_tokens,
    }
    return {k: v for k, v in fields.items() if v is not None}


def cmd_serve(args) -> int:
    import uvicorn

    from orchestrator.api import create_app
    from orchestrator.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    # Open event streams would hold a graceful shutdown until their jobs end; give them a few seconds only.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0


def cmd_train(args) -> int:
    request = {
        "num_examples": args.num_examples,
        "offset": args.offset,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "checkpoint_every": args.checkpoint_every,
        "search": _search(args),
    }
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
    from orchestrator.evaluation import accuracy_table

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
    from orchestrator.demo import run_demo

    return run_demo(args)


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
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-examples", type=int, default=10)
    p.add_argument("--max-depth", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--chunk-tokens", type=int, default=None)
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

    from orchestrator.demo import add_demo_arguments

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
