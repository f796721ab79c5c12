"""The one place a search asks the student for samples (both shapes): a chat completion of the question, or a
continuation of a partial solution (vLLM's `continue_final_message`), with n samples and their log-probs.

Whoever serves the student (the trainer's own engine today, a vLLM server with the adapter loaded tomorrow)
only has to answer this request: OpenAI chat completions with n, max_tokens, temperature, stop, seed, logprobs
and the two vLLM chat-template flags.
"""

from __future__ import annotations

from orchestrator.clients.llm import Completion, LLMPool, LogprobsUnavailable
from orchestrator.settings import EndpointSpec


def continuation(messages: list[dict], partial: str) -> tuple[list[dict], dict]:
    """The chat request that continues `partial` (the solution written so far) after the question `messages`;
    with no partial, a fresh answer."""
    if not partial:
        return messages, {"add_generation_prompt": True, "continue_final_message": False}
    return (
        [*messages, {"role": "assistant", "content": partial}],
        {"add_generation_prompt": False, "continue_final_message": True},
    )


async def sample_student(
    pool: LLMPool,
    student: EndpointSpec,
    messages: list[dict],
    partial: str,
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    seed: int | None = None,
    stop: list[str] | None = None,
    logprobs: bool = True,
) -> Completion:
    """n samples of the student after `partial`. With `logprobs` each choice carries its tokens and their
    log-probs; a server that cannot give them is asked again without (the choices then have none, and the
    caller falls back to what it does without priors). LLMError when the request fails for good."""
    chat_messages, extra = continuation(messages, partial)
    params = {
        "n": n,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stop": stop,
        "seed": seed,
        **extra,
    }
    if logprobs:
        try:
            return await pool.chat(student, chat_messages, logprobs=True, **params)
        except LogprobsUnavailable:
            pass
    return await pool.chat(student, chat_messages, **params)
