"""Server-sent events in OpenAI's streaming format: `data: <chunk JSON>` per chunk (fields that are None left out,
as OpenAI's own chunks leave out what they do not carry), then `data: [DONE]`. A failure after the first byte can
no longer change the status: it is sent as one `data: {"error": ...}` event in the service's error shape, then
`data: [DONE]`, as vLLM does."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from services.protocol import ErrorBody, ErrorInfo

from ..errors import TrainerError

log = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"
# The OpenAPI of a streamed 200: each event's `data` is one chunk as JSON (or [DONE]).
SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string", "description": "a chunk as JSON, or [DONE] at the end"}},
    "required": ["data"],
}


def event_stream(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    async def frames() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
        except Exception as exc:
            status = exc.status if isinstance(exc, TrainerError) else 500
            if status >= 500:
                log.exception("a streamed response failed")
            kind = "invalid_request_error" if status < 500 else "server_error"
            error = ErrorBody(error=ErrorInfo(message=str(exc), type=kind, code=status), detail=str(exc))
            yield f"data: {error.model_dump_json()}\n\n"
        yield DONE

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
