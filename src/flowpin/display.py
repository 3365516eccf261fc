"""Human output of untrusted text: every string a manifest (or a file it names) carries goes through here.

A manifest is attacker-controllable until it verifies, and even a signed one carries strings its stage
copied from elsewhere (subject names, overrides, annotations). Printed raw, a name holding a newline and
ANSI escapes can forge whole lines ("all outputs verified OK" in green), and a U+202E can reverse what a
reader sees. :func:`safe` makes such text inert: C0 controls (newline and tab included), DEL, C1 controls,
and Unicode format, surrogate, private-use, unassigned and line/paragraph-separator characters are
written as ``\\xNN`` / ``\\uNNNN`` / ``\\UNNNNNNNN``. Printable text (any script, the space, ``→``, ``…``)
passes unchanged. JSON output does not need it: ``json.dumps`` escapes control characters itself.
"""

from __future__ import annotations

import unicodedata

_KEPT_SEPARATORS = "Zs"
"""Space separators (U+00A0 and friends) are shown as they are: they cannot move the cursor or reorder text."""


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe(text: object) -> str:
    """``str(text)`` with every control, format (bidi), separator and unassigned character escaped."""
    s = str(text)
    if s.isprintable():  # the common case: Python's printable excludes every category escaped below
        return s
    return "".join(ch if ch.isprintable() or unicodedata.category(ch) == _KEPT_SEPARATORS else _escape(ch) for ch in s)


def safe_lines(text: object) -> str:
    """:func:`safe` per line: for messages that flowpin itself lays out on several lines (a log tail).

    The line breaks are kept; every other control character is escaped. Use :func:`safe` for anything
    that must stay on one line (a name, a finding).
    """
    return "\n".join(safe(line) for line in str(text).split("\n"))


__all__ = ["safe", "safe_lines"]
