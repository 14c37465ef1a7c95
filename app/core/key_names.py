"""Names for API keys, so the audit log says *who* changed a product without ever storing a key.

Key lists keep their two old forms (``k1,k2`` and ``["k1","k2"]``, read by ``parse_key_list``); a JSON object
``{"alice": "k1"}`` names its keys (``split_named_keys``). Both readers live here, beside the names, so the
settings' validators only call them. A key given without a name is called ``<scope>-<first 8 hex digits of its
SHA-256>``: stable across restarts and reorderings, and no secret.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")


def key_fingerprint(key: str) -> str:
    """Hex SHA-256 of a key: what the name table is indexed by (the key itself is never kept twice)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def split_named_keys(value: Any) -> tuple[Any, dict[str, str]]:
    """``(keys, {fingerprint: name})`` for a JSON object of names to keys; any other value unchanged, no names.

    Raises ``ValueError`` for a bad name or a non-string key, with a message that names the problem."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"key object looks like JSON but does not parse: {e.msg}") from None
    if not isinstance(value, dict):
        return value, {}
    names: dict[str, str] = {}
    for name, key in value.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"key name {name!r} must be 1-64 letters, digits, spaces or . _ @ - "
                             "(starting with a letter or digit)")
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"key {name!r} must be a non-empty string")
        names[key_fingerprint(key.strip())] = name
    return list(value.values()), names


def derived_name(scope: str, fingerprint: str) -> str:
    """The name of a key configured without one."""
    return f"{scope}-{fingerprint[:8]}"


def parse_key_list(v: Any) -> list[str]:
    """Accept `a,b`, `["a","b"]` or a Python list; strip blanks so a trailing comma is harmless.

    Raises ``ValueError`` (a settings validation error) for anything else, a non-string key or one with
    whitespace; repeated keys are kept once, in order."""
    if v is None:
        return []
    if isinstance(v, str):
        text = v.strip()
        if text.startswith("["):
            try:
                v = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"key list looks like JSON but does not parse: {e.msg}") from None
        else:
            v = text.split(",")
    if not isinstance(v, list | tuple):
        raise ValueError("expected a comma-separated string or a list of strings")
    keys: list[str] = []
    for item in v:
        if not isinstance(item, str):
            raise ValueError("every key must be a string")
        key = item.strip()
        if not key:
            continue
        if any(c.isspace() for c in key):
            raise ValueError(
                "keys must not contain whitespace (they are sent as `Authorization: Bearer <key>`)"
            )
        if key not in keys:
            keys.append(key)
    return keys
