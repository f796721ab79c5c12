"""Final-answer extraction and numeric comparison for GSM8K-style solutions.

Two extractors, as in the usual GSM8K evaluation:
- strict: the number on the last `#### ` line (the format the prompt asks for);
- flexible: the last number anywhere in the text.
Both return a canonical number string ("1000", "0.5", "-3") or None. Commas as thousands separators, a `$`
sign, units and trailing periods are dropped; simple fractions ("3/4") become decimals. `same_number` compares
numerically, so "1,000" == "1000.0" == "$1000".
"""

from __future__ import annotations

import math
import re

# A number as people write it: optional sign, optional $, thousands groups or plain digits, optional decimals;
# or a simple fraction. The sign only counts when it is not a minus between two operands ("16-3").
_NUMBER = re.compile(
    r"(?P<sign>-(?=\$?\.?\d))?\$?\s?"
    r"(?:(?P<num>\d+)\s*/\s*(?P<den>\d+)(?![\d.,]*\d)"  # 3/4 (not 1/2/2020-ish runs of digits)
    r"|(?P<value>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+))"
)
_STRICT_MARK = "####"


def _canonical(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(round(value, 10)).rstrip("0").rstrip(".")


def _numbers(text: str) -> list[str]:
    """Every number in `text`, canonical, in order."""
    found: list[str] = []
    for m in _NUMBER.finditer(text):
        negative = False
        if m.group("sign"):
            before = text[m.start() - 1] if m.start() else " "
            # "16-3": a minus glued to an operand on its left is an operator, not a sign.
            negative = not (before.isalnum() or before in ").%")
        if m.group("value") is not None:
            value = float(m.group("value").replace(",", ""))
        else:
            den = float(m.group("den"))
            if den == 0:
                continue
            value = float(m.group("num")) / den
        found.append(_canonical(-value if negative else value))
    return found


def extract_strict(text: str) -> str | None:
    """The first number after the last `####` marker; None without a marker or a number after it."""
    if not text or _STRICT_MARK not in text:
        return None
    tail = text.rsplit(_STRICT_MARK, 1)[1].split("\n", 1)[0]
    numbers = _numbers(tail)
    return numbers[0] if numbers else None


def extract_flexible(text: str) -> str | None:
    """The last number anywhere in the text (None when there is none)."""
    if not text:
        return None
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def extract_answer(text: str) -> str | None:
    """Strict when the text has a `####` answer, else flexible: what a search leaf is scored on."""
    return extract_strict(text) or extract_flexible(text)


def parse_number(text: str | None) -> float | None:
    """The numeric value of a number string as written ("$1,000.00" -> 1000.0); None when it is not one."""
    if text is None:
        return None
    s = str(text).strip().rstrip(".").strip()
    if not s:
        return None
    numbers = _numbers(s)
    if len(numbers) != 1:
        return None
    value = float(numbers[0])
    return value if math.isfinite(value) else None


def same_number(a: str | None, b: str | None) -> bool:
    """Numeric equality with a small relative tolerance; False when either side is not a number."""
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
