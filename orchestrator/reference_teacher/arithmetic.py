"""Numbers as GSM8K solutions write them, and the arithmetic of their calculator notes (`<<48/2=24>>`)."""

from __future__ import annotations

import ast
import operator
import re

from orchestrator.gsm8k.answers import parse_number

NUMBER = re.compile(r"(?<![\w.])-?\$?\d[\d,]*(?:\.\d+)?|(?<![\w.])-?\.\d+")
LEADING_NUMBER = re.compile(r"^(\s*\$?)(-?\d[\d,]*(?:\.\d+)?)")
NOTE = re.compile(r"<<([^<>]*)>>")


def number_value(text: str) -> float | None:
    """The value of one number as written ("$1,000.50" -> 1000.5)."""
    return parse_number(text.replace("$", ""))


def format_number(value: float) -> str:
    """A number as GSM8K writes it: integers without a point, others with at most 2 decimals."""
    if abs(value - round(value)) < 1e-9:
        return str(round(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def values(text: str) -> list[float]:
    """Every number in `text`, in order."""
    return [v for v in (number_value(m) for m in NUMBER.findall(text)) if v is not None]


def as_shown(value: float | None) -> float | None:
    """A value rounded as format_number writes it (12/59 shows as 0.2, the same as 12/60)."""
    return None if value is None else float(format_number(value))


_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def evaluate(expression: str) -> float | None:
    """The value of a calculator note's arithmetic (+ - * / // % and parentheses), None if it is anything else
    or divides by zero."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError("not arithmetic")

    try:
        return walk(ast.parse(expression.strip(), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError, OverflowError):
        return None
