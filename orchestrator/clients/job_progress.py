"""A job followed in the terminal: its events drawn as a tqdm progress bar (train steps or eval answers)."""

from __future__ import annotations

from tqdm import tqdm

from orchestrator.clients.orchestrator import OrchestratorClient


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
