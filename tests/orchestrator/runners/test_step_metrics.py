from orchestrator.runners.step_metrics import grpo_metrics
from services.protocol import GrpoStepResponse


def test_the_step_record_carries_the_trainer_updates():
    """The job's step record says how many optimizer steps the trainer's /grpo/step made, and their norms."""
    answer = GrpoStepResponse.model_validate(
        {
            "loss": 0.5,
            "kl": 0.0,
            "clip_fraction": 0.25,
            "grad_norm": 0.3,
            "tokens": 40,
            "adapter_version": 3,
            "step": 3,
            "duplicate": False,
            "micro_batches": 2,
            "updates": 2,
            "per_update": [
                {"items": 4, "tokens": 20, "loss": 0.4, "grad_norm": 0.2, "clip_fraction": 0.0},
                {"items": 4, "tokens": 20, "loss": 0.6, "grad_norm": 0.4, "clip_fraction": 0.5},
            ],
        }
    )
    record = grpo_metrics(answer, seconds=1.25)
    assert (record["updates"], record["update_grad_norms"], record["adapter_version"]) == (2, [0.2, 0.4], 3)
    # a trainer from before loss.updates: one update, none listed
    older = answer.model_dump(exclude={"updates", "per_update"})
    assert grpo_metrics(GrpoStepResponse.model_validate(older), 1.0) | {"grpo_seconds": 1.25} == record | {
        "updates": 1,
        "update_grad_norms": [],
    }
