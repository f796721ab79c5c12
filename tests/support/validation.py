"""Reading pydantic validation errors in tests."""

from pydantic import ValidationError


def field_of(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}
