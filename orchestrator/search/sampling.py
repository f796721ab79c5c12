"""The one place a search asks the student for samples (both shapes): a chat completion of the question, or a
continuation of a partial solution (vLLM's `continue_final_message`), with n samples and their log-probs.

Whoever serves the student only has to answer this request: OpenAI chat completions with n, max_tokens,
temperature, stop, seed, logprobs and the two vLLM chat-template flags. Two servers do:
- the trainer's own engine (the default): `model: "student"` is its current adapter, and its answers say the
  adapter version that wrote them;
- a student server that loads the trainer's adapters at runtime (STUDENT_URL; clients/student_adapters.py):
  each request goes to the current version's name, leased until it ends, and comes back stamped with that version.
  It is also asked for the sampled token ids (`return_token_ids`), which the GRPO step scores, and for the plain
  distribution (top_p 1, top_k off), which is what the trainer's importance ratio compares against: vLLM would
  otherwise apply the sampling defaults of the model's generation_config.json.
"""

from __future__ import annotations

from orchestrator.clients.llm import Completion, LLMPool, LogprobsUnavailable
from orchestrator.clients.student_adapters import StudentAdapters
from orchestrator.settings import EndpointSpec

# Sampling fields a student server gets besides the search's: the model's own distribution (as the trainer samples)
# and the sampled ids.
STUDENT_SERVER_PARAMS = {"top_p": 1.0, "top_k": 0, "return_token_ids": True}


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
    adapters: StudentAdapters | None = None,
) -> Completion:
    """n samples of the student after `partial`; `adapters` set: from the student server `student` names, under
    the current adapter version. With `logprobs` each choice carries its tokens and their log-probs (and, from a
    student server, their ids); a server that cannot give them is asked again without (the choices then have
    none, and the caller falls back to what it does without priors). The completion's `adapter_version` says
    which version wrote it (None when the server does not say). LLMError when the request fails for good;
    StudentServerError when the student server cannot get the current version loaded again."""
    chat_messages, extra = continuation(messages, partial)
    params = {
        "n": n,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stop": stop,
        "seed": seed,
        **extra,
        **(STUDENT_SERVER_PARAMS if adapters is not None else {}),
    }

    async def chat(**more) -> Completion:
        if adapters is None:
            return await pool.chat(student, chat_messages, **params, **more)
        return await adapters.chat(pool, student, chat_messages, **params, **more)

    if logprobs:
        try:
            return await chat(logprobs=True)
        except LogprobsUnavailable:
            pass
    return await chat()
