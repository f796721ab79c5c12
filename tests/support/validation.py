"""Reading pydantic validation errors in tests."""

from pydantic import ValidationError

from services.protocol import is_branch_tag


def field_of(exc: ValidationError) -> set[str]:
    """The fields the errors name (a union's branch tag, "<one>"/"<many>", left out as the services do)."""
    return {".".join(str(p) for p in e["loc"] if not is_branch_tag(p)) for e in exc.errors()}
