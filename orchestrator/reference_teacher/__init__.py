"""The reference teacher: an OpenAI-compatible server that stands in for a strong (70B-class) teacher by writing
from the worked reference solution of a GSM8K train problem.

Teachers of the size the product is meant for solve 90-95% of GSM8K; the only model these machines hold is the
135M student. This server plays such a teacher without a model: it reads the teacher prompts the orchestrator
sends (orchestrator/search/teachers.py: a "right" or a "wrong" step, one line or the whole rest of the solution), finds
the problem by its question text among the GSM8K train problems (never test: an unknown question is answered
404), works out how far the partial solution has got along the reference, and writes

- right, one line:  the next reference step (calculator notes removed), or `#### N` once every step is done;
- right, whole:     the rest of the reference, ending in `#### N`;
- wrong, one line:  the next step with a typical mistake: an arithmetic slip in its result, a misread operand or
                    a wrong operation (the result recomputed), or a wrong final answer once every step is done
                    (a step with no number to get wrong is passed over for the next one that has one);
- wrong, whole:     that wrong step, then the rest of the reference with the error carried through every later
                    calculation, ending in a wrong `#### N`.

Alignment (steps_done). A GSM8K step carries a calculator note `<<48/2=24>>`; the step's result is the note's
result (else the line's last number). Taken in order, each reference step claims the first line of the partial
solution not yet claimed that is the step as it is, or shows the step's result after an `=`, or ends in it (a
number that is also in the question must follow an `=`, so restating the question does not count). The next step
is the one after the last step claimed, so a teacher continuing a partial that went wrong writes the first
correct step after the last one it got right, as a tutor would.

Sampling. "Right" has one answer, so its n choices are the same text. "Wrong" choices are drawn from a
random.Random seeded by (seed, choice index, question, partial): deterministic for a given seed, different
across the n choices of a request where the step allows it; without a seed every request draws afresh.
`temperature` is accepted and ignored. `max_tokens` cuts the text (finish_reason "length"), `stop` strings cut
it ("stop" with the string as `stop_reason`), a text that ends by itself finishes "stop" with `stop_reason` null
(as vLLM reports an end of sequence). Tokens are counted with a tokenizer file when one is configured
(REFERENCE_TEACHER_TOKENIZER: a tokenizer.json, e.g. the student's, so `usage` is in the student's tokens), else
as word pieces (runs of letters, single digits, single other characters): 14% fewer than SmolLM2's tokenizer
counts on GSM8K reference solutions (38,951 vs 45,253 tokens on the first 500).

Run it:  python -m orchestrator.reference_teacher --port 8010    (GSM8K from GSM8K_PATH, else the hub, else the shipped copy)
and use it as the teachers:  TEACHER_TIER=custom
    TEACHERS=[{"name":"reference","base_url":"http://127.0.0.1:8010/v1","model":"reference"}]
Routes: POST /v1/chat/completions, GET /v1/models, GET /health.

Modules, each one idea, the HTTP layer on top of an engine that knows nothing of HTTP: arithmetic (numbers and
calculator notes), references (the solutions by question), prompts (reading a teacher prompt), alignment (how far
a partial solution got), mistakes (wrong steps), writing (the texts of a request), tokens (counting and cutting),
engine (a request end to end, counters), errors (each with its HTTP status), server (settings, FastAPI app, main).
"""
