import pytest

from orchestrator.gsm8k.answers import (
    extract_answer,
    extract_flexible,
    extract_strict,
    parse_number,
    same_number,
)

# (text, strict, flexible)
CASES = [
    ("#### 18", "18", "18"),
    ("#### 1,000", "1000", "1000"),
    ("#### $1,000.", "1000", "1000"),
    ("#### 1,234,567", "1234567", "1234567"),
    ("She earns 9 * 2 = $18.\n#### 18", "18", "18"),
    ("#### $18.00", "18", "18"),
    ("#### 18 dollars", "18", "18"),
    ("#### -3", "-3", "-3"),
    ("#### 0.5", "0.5", "0.5"),
    ("#### 1/2", "0.5", "0.5"),
    ("#### 12%", "12", "12"),
    ("#### 7 apples.", "7", "7"),
    ("first #### 5\nthen\n#### 6", "6", "6"),
    ("####42", "42", "42"),
    ("#### ", None, None),
    ("#### none", None, None),
    ("The answer is 42.", None, "42"),
    ("The answer is -5 dollars.", None, "-5"),
    ("Janet sells 16-3-4=9 eggs", None, "9"),
    ("16 - 3", None, "3"),
    ("x=-2.5", None, "-2.5"),
    ("It costs -$5 in total", None, "-5"),
    ("He paid $1,234.50 total.", None, "1234.5"),
    ("so 3/4 of them", None, "0.75"),
    ("numbers 1,2,3", None, "3"),
    ("the value is .5", None, "0.5"),
    ("I think it is 7.", None, "7"),
    ("It takes 2/2=<<2/2=1>>1 bolt", None, "1"),
    ("The total is 1000.0 units", None, "1000"),
    ("no numbers here", None, None),
    ("", None, None),
    ("(-7) degrees", None, "-7"),
    ("$ 40 each", None, "40"),
    ("answer: 3 - -2", None, "-2"),
    ("a 10:30 meeting, 4 people", None, "4"),
    ("\\boxed{25}", None, "25"),
]


@pytest.mark.parametrize("text,strict,flexible", CASES)
def test_extraction(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_extract_answer_prefers_strict():
    assert extract_answer("we get 5 then\n#### 7\nand 9") == "7"
    assert extract_answer("we get 5 then 9") == "9"


@pytest.mark.parametrize(
    "text,value",
    [
        ("1,000", 1000.0),
        ("$1,000.00", 1000.0),
        ("1000.", 1000.0),
        ("-3", -3.0),
        ("0.25", 0.25),
        ("3/4", 0.75),
        (None, None),
        ("", None),
        ("abc", None),
        ("1 and 2", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "a,b,equal",
    [
        ("1,000", "1000.0", True),
        ("$18", "18", True),
        ("18.00", "18", True),
        ("0.5", "1/2", True),
        ("18", "19", False),
        ("18", None, False),
        (None, None, False),
        ("x", "x", False),
        ("-3", "3", False),
    ],
)
def test_same_number(a, b, equal):
    assert same_number(a, b) is equal
