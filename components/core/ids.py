"""Identifiers safe to embed in object keys and tags."""

from __future__ import annotations

import re

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def validate_id(value: str, what: str = "identifier") -> str:
    """Accept ids safe to embed in object keys and tags (no '/', no '..')."""
    # fullmatch: with match() and "$" a trailing newline would slip through
    if not isinstance(value, str) or not _ID_RE.fullmatch(value) or ".." in value:
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return value
