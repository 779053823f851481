"""Numbers written in words and digits, both ways: `to_words(34) == "thirty-four"` and
`parse_numbers("thirty-four plus 21") == [34, 21]`.

The school world writes sums in both forms (the corpus teaches that "34" and "thirty-four" are
the same number) and the teacher must read either form back from a prompt or an answer. Range:
0 to 999, British style ("one hundred and five").
"""

from __future__ import annotations

import re

UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

_UNIT_VALUE = {w: i for i, w in enumerate(UNITS)}
_TENS_VALUE = {w: 10 * i for i, w in enumerate(TENS) if w != "_"}
_TOKEN = re.compile(r"\d+|[a-z]+")


def to_words(n: int) -> str:
    """34 -> "thirty-four", 105 -> "one hundred and five" (0 <= n <= 999)."""
    if not 0 <= n <= 999:
        raise ValueError(f"to_words handles 0..999, got {n}")
    if n < 20:
        return UNITS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return TENS[tens] + ("-" + UNITS[unit] if unit else "")
    hundreds, rest = divmod(n, 100)
    head = UNITS[hundreds] + " hundred"
    return head + (" and " + to_words(rest) if rest else "")


def parse_numbers(text: str) -> list[int]:
    """Every number in `text`, in order, whether written in digits or in words.

    "thirty four", "thirty-four" and "34" all read as 34; "one hundred and five" as 105.
    """
    out: list[int] = []
    cur: int | None = None
    last = ""  # kind of the previous number token: "unit", "tens", "hundred", "and"

    def flush() -> None:
        nonlocal cur, last
        if cur is not None:
            out.append(cur)
        cur, last = None, ""

    for tok in _TOKEN.findall(text.lower()):
        if tok.isdigit():
            flush()
            out.append(int(tok))
        elif tok in _UNIT_VALUE:
            v = _UNIT_VALUE[tok]
            if cur is not None and (last in ("hundred", "and") or (last == "tens" and v < 10)):
                cur += v
            else:
                flush()
                cur = v
            last = "unit"
        elif tok in _TENS_VALUE:
            if cur is not None and last in ("hundred", "and"):
                cur += _TENS_VALUE[tok]
            else:
                flush()
                cur = _TENS_VALUE[tok]
            last = "tens"
        elif tok == "hundred" and cur is not None and last == "unit" and 0 < cur < 10:
            cur *= 100
            last = "hundred"
        elif tok == "and" and last == "hundred":
            last = "and"
        else:
            flush()
    flush()
    return out
