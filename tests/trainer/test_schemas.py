"""Request validation: every refusal names its field; defaults follow the OpenAI wire format."""

import pytest
from pydantic import ValidationError

from services.trainer.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GrpoStepRequest,
    LogprobsRequest,
    SaveCheckpointRequest,
)


def field_of(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


def test_completion_defaults_and_stop_normalisation():
    req = CompletionRequest(model="student", prompt="hi", stop="\n", user="x", presence_penalty=0)
    assert (req.max_tokens, req.temperature, req.top_p, req.n, req.stop, req.echo) == (
        16,
        1.0,
        1.0,
        1,
        ["\n"],
        False,
    )
    assert CompletionRequest(model="base", prompt=["a", "b"]).stop == []


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": "student", "prompt": ""}, "prompt"),
        ({"model": "student", "prompt": []}, "prompt"),
        ({"model": "gpt", "prompt": "x"}, "model"),
        ({"model": "student", "prompt": "x", "n": 0}, "n"),
        ({"model": "student", "prompt": "x", "n": 65}, "n"),
        ({"model": "student", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "student", "prompt": "x", "stop": [""]}, "stop"),
        ({"model": "student", "prompt": "x", "stream": True}, "stream"),
    ],
)
def test_completion_refusals_name_the_field(body, field):
    with pytest.raises(ValidationError) as info:
        CompletionRequest(**body)
    assert field in field_of(info.value)


def test_chat_continue_final_message_needs_an_assistant_message():
    with pytest.raises(ValidationError, match="continue_final_message"):
        ChatCompletionRequest(
            model="student", messages=[{"role": "user", "content": "x"}], continue_final_message=True
        )
    req = ChatCompletionRequest(
        model="student", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    )
    assert req.messages[0].text() == "hi" and req.add_generation_prompt


def test_logprobs_items_need_exactly_one_prompt():
    assert LogprobsRequest(items=[{"prompt": "a", "completion": "b"}]).model == "student"
    for item in [
        {"completion": "b"},
        {"prompt": "a", "messages": [{"role": "user", "content": "a"}], "completion": "b"},
    ]:
        with pytest.raises(ValidationError, match="exactly one"):
            LogprobsRequest(items=[item])


@pytest.mark.parametrize(
    "item, field",
    [
        ({"prompt": "a", "completion": "b", "advantage": float("nan")}, "items.0.advantage"),
        ({"prompt": "a", "completion": "b", "advantage": float("inf")}, "items.0.advantage"),
        ({"prompt": "a", "completion": "", "advantage": 1.0}, "items.0.completion"),
        ({"prompt": "a", "completion": "b", "advantage": 1.0, "weight": -1}, "items.0.weight"),
        (
            {"prompt": "a", "completion": "b", "advantage": 1.0, "old_logprobs": [float("nan")]},
            "items.0.old_logprobs.0",
        ),
    ],
)
def test_grpo_item_refusals(item, field):
    with pytest.raises(ValidationError) as info:
        GrpoStepRequest(items=[item])
    assert field in field_of(info.value)


def test_grpo_loss_defaults_and_bad_type():
    req = GrpoStepRequest(items=[{"prompt": "a", "completion": "b", "advantage": 0.5}])
    assert (
        req.loss.type,
        req.loss.beta,
        req.loss.clip_eps,
        req.loss.max_grad_norm,
        req.loss.micro_batch_size,
    ) == ("grpo", 0.04, 0.2, 1.0, 8)
    with pytest.raises(ValidationError) as info:
        GrpoStepRequest(items=[{"prompt": "a", "completion": "b", "advantage": 0.5}], loss={"type": "ppo"})
    assert "loss.type" in field_of(info.value)


def test_checkpoint_names_cannot_escape():
    with pytest.raises(ValidationError):
        SaveCheckpointRequest(name="../x")
    assert SaveCheckpointRequest().name is None
