"""CSV cells that a spreadsheet would run as a formula (a file named `=cmd|...`, `+HYPERLINK(...)`),
escaped the usual way: a leading quote, which spreadsheets show as text; readers take it off again.

Every CSV the project writes escapes its text cells with `escape`, and every reader unescapes them
with `unescape`, so a value round-trips exactly. Numbers are never escaped ("-0.5" is a number to a
spreadsheet, not a formula).
"""

from __future__ import annotations

#: What a spreadsheet reads as the start of a formula (OWASP "CSV injection"), and the quote itself
#: (escaped too, so that unescaping is exact).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def escape(text: str) -> str:
    """A text cell made safe to open in a spreadsheet."""
    if text.startswith(FORMULA_START) and not _is_number(text):
        return "'" + text
    return text


def unescape(text: str) -> str:
    """The value `escape` was given."""
    if text.startswith("'") and len(text) > 1 and text[1:].startswith(FORMULA_START) and not _is_number(text[1:]):
        return text[1:]
    return text


def unescape_row(row: dict) -> dict:
    return {k: unescape(v) if isinstance(v, str) else v for k, v in row.items()}
