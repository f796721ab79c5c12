"""What a train step reports: its search, its GRPO update and its trees, as one metrics dict, and where that
goes besides the job's records (Prometheus, Weights & Biases)."""

from __future__ import annotations

import logging
from typing import Any

from orchestrator.runners.batch_search import BatchSearch
from orchestrator.runners.telemetry import Telemetry
from orchestrator.runners.trajectories import rescued, trajectories
from orchestrator.search.services import SearchServices
from orchestrator.search.tree import Tree
from orchestrator.settings import Settings
from services.protocol import GrpoStepResponse

log = logging.getLogger(__name__)


def tree_metrics(trees: list[Tree]) -> dict[str, Any]:
    """Mean leaf reward and share of correct leaves over every root-to-terminal path of the step's trees; the
    share among the answers the student wrote alone, the trees only a teacher's text got right ("rescued"), and
    the adapter versions the student's text in them came from."""
    per_tree = [trajectories(tree) for tree in trees]
    paths = [t for group in per_tree for t in group]
    own = [t for t in paths if t.on_policy]
    rewards = [float(p.reward) for p in paths if p.reward is not None]
    versions = {n.adapter_version for tree in trees for n in tree if n.adapter_version is not None}
    return {
        "trajectories": len(paths),
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        "correct_leaf_share": sum(bool(p.correct) for p in paths) / len(paths) if paths else None,
        "student_correct_share": sum(bool(p.correct) for p in own) / len(own) if own else None,
        "rescued_groups": sum(rescued(group) for group in per_tree),
        "sample_versions": sorted(versions),
    }


def teacher_weights(services: SearchServices) -> dict[str, float] | None:
    """The ensemble's current dynamic weights, when it exposes them."""
    teachers = getattr(services, "teachers", None)
    weights = getattr(teachers, "weights", None)
    if callable(weights):
        weights = weights()
    if isinstance(weights, dict):
        return {str(k): round(float(v), 4) for k, v in weights.items()}
    return None


def search_metrics(
    problems: int, searched: BatchSearch, items: int, dropped_groups: int, services: SearchServices
) -> dict[str, Any]:
    """The step's metrics known once its batch is searched and turned into `items` GRPO items (trees whose
    group was dropped, all answers equally correct, are `dropped_groups`). Generated tokens are the student's and
    the teachers' text of the step (`search_tokens` is the same figure, kept for older readers)."""
    return {
        "problems": problems,
        "trees": len(searched.trees),
        "items": items,
        "dropped_groups": dropped_groups,
        **tree_metrics(searched.trees),
        "teacher_weights": teacher_weights(services),
        "search_tokens": searched.tokens,
        "generated_tokens": searched.tokens,
        "student_tokens": searched.student_tokens,
        "teacher_tokens": searched.teacher_tokens,
        "search_requests": searched.requests,
        "teacher_errors": searched.teacher_errors,
        "student_unavailable": searched.student_unavailable,
        "search_errors": searched.search_errors,
        "degraded": searched.degraded,
        "search_seconds": round(searched.seconds, 3),
    }


def grpo_metrics(result: GrpoStepResponse, seconds: float) -> dict[str, Any]:
    """The trainer's answer to the step's /grpo/step."""
    return {
        "loss": result.loss,
        "kl": result.kl,
        "clip_fraction": result.clip_fraction,
        "grad_norm": result.grad_norm,
        "train_tokens": result.tokens,
        "micro_batches": result.micro_batches,
        "updates": result.updates,
        "update_grad_norms": [u.grad_norm for u in result.per_update],
        "adapter_version": result.adapter_version,
        "trainer_step": result.step,
        "duplicate": result.duplicate,
        "is_weight_mean": result.is_weight_mean,
        "is_truncated_fraction": result.is_truncated_fraction,
        "grpo_seconds": round(seconds, 3),
    }


def count_step(telemetry: Telemetry | None, metrics: dict[str, Any]) -> None:
    """A finished step in the Prometheus metrics (an applied update, the adapter version, the mean reward)."""
    if telemetry is None:
        return
    if not metrics.get("skipped"):
        telemetry.train_steps.inc()
        if metrics.get("adapter_version") is not None:
            telemetry.adapter_version.set(metrics["adapter_version"])
    if metrics.get("mean_reward") is not None:
        telemetry.step_mean_reward.set(metrics["mean_reward"])


class WandbSink:
    """Per-step metrics to Weights & Biases when WANDB_PROJECT is set and wandb is installed (WANDB_MODE=offline
    writes the run under WANDB_DIR for `wandb sync` later). Opening and finishing block: call them off the loop."""

    def __init__(self, settings: Settings, job_id: str, config: dict[str, Any]):
        self.run = None
        if not settings.wandb_project:
            return
        try:
            import wandb  # pyright: ignore[reportMissingImports]  # optional dependency
        except ImportError:
            log.warning("WANDB_PROJECT is set but wandb is not installed; not logging to W&B")
            return
        key = settings.wandb_api_key.get_secret_value() if settings.wandb_api_key else None
        if key:
            wandb.login(key=key, relogin=False)
        # One run per train job, beside any other run of this process (wandb >= 0.19.10 names this mode).
        self.run = wandb.init(
            project=settings.wandb_project,
            name=job_id,
            id=job_id,
            resume="allow",
            config=config,
            reinit="create_new",
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
