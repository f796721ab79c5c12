"""OpenAI request validation: every refusal names its field; defaults follow the OpenAI wire format."""

import pytest
from pydantic import ValidationError

from services.protocol import ChatCompletionRequest, CompletionRequest
from support.validation import field_of


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
        ({"model": "student", "prompt": "x", "stop": [""]}, "stop.0"),
        ({"model": "student", "prompt": "x", "stream": 1}, "stream"),
        ({"model": "student", "prompt": "x", "n": 1.0}, "n"),
    ],
)
def test_completion_refusals_name_the_field(body, field):
    with pytest.raises(ValidationError) as info:
        CompletionRequest(**body)
    assert field in field_of(info.value)


def test_stream_options_ask_for_the_usage_chunk_only_when_streaming():
    assert CompletionRequest(
        model="base", prompt="x", stream=True, stream_options={"include_usage": True}
    ).include_usage
    assert not CompletionRequest(
        model="base", prompt="x", stream_options={"include_usage": True}
    ).include_usage
    assert not CompletionRequest(model="base", prompt="x", stream=True).include_usage


def test_chat_continue_final_message_needs_an_assistant_message():
    with pytest.raises(ValidationError, match="continue_final_message"):
        ChatCompletionRequest(
            model="student", messages=[{"role": "user", "content": "x"}], continue_final_message=True
        )
    req = ChatCompletionRequest(
        model="student", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    )
    assert req.messages[0].text() == "hi" and req.add_generation_prompt
