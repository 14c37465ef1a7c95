"""Operator-facing checks of the ``CLIPSHOT_*`` environment: settings errors named by variable, typos flagged.

Why: pydantic reports ``max_batch_size  Input should be ...`` over several lines, but the operator set
``CLIPSHOT_MAX_BATCH_SIZE``; and a misspelt ``CLIPSHOT_ADMIN_KEY`` was silently ignored, which for a
security setting is the worst outcome. Both answers name the variable to change.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import ValidationError

from app.core.config import ENV_PREFIX, Settings, env_var

# CLIPSHOT_* variables read outside ``Settings``, so not typos: CLIPSHOT_KEY is the key `clipshot predict`
# sends to a running service (a client's secret, not the server's).
EXTRA_KNOWN: frozenset[str] = frozenset({"CLIPSHOT_KEY"})


def known_variables() -> set[str]:
    """Every ``CLIPSHOT_*`` name the service or the CLI reads."""
    return {env_var(name) for name in Settings.model_fields} | EXTRA_KNOWN


def settings_error_line(exc: ValidationError, cli_flags: Mapping[str, str] | None = None) -> str:
    """One line: ``invalid settings: CLIPSHOT_X='v': why; CLIPSHOT_Y: why``."""
    cli_flags = cli_flags or {}
    fields = set(Settings.model_fields)
    parts = []
    for error in exc.errors(include_url=False):
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        loc = [str(p) for p in error.get("loc", ()) if isinstance(p, str)]
        if loc and loc[0] in fields:
            name = env_var(loc[0]) + (f" (or {cli_flags[loc[0]]})" if loc[0] in cli_flags else "")
            value = error.get("input")
            shown = f"={value!r}" if isinstance(value, str | int | float) and not _secret(loc[0]) else ""
            parts.append(f"{name}{shown}: {message}")
        else:  # cross-field rule: name every variable it mentions
            parts.append(_fields_to_env(message, fields))
    return "invalid settings: " + "; ".join(" ".join(p.split()) for p in parts)


def _secret(field: str) -> bool:
    """Settings whose values must not be echoed in an error line."""
    return "key" in field or "password" in field or field == "opcua_users"


def _fields_to_env(message: str, fields: Iterable[str]) -> str:
    names = "|".join(sorted(fields, key=len, reverse=True))
    return re.sub(rf"\b({names})\b", lambda m: env_var(m.group(1)), message)


def unknown_env_warnings(environ: Mapping[str, str] | None = None, env_file: str | Path = ".env") -> list[str]:
    """A warning per ``CLIPSHOT_*`` variable (environment or ``.env``) that no setting reads, with a guess."""
    environ = os.environ if environ is None else environ
    names = {name.upper(): "environment" for name in environ if name.upper().startswith(ENV_PREFIX)}
    path = Path(env_file)
    if path.is_file():
        from dotenv import dotenv_values  # python-dotenv: pydantic-settings' own .env reader

        for name in dotenv_values(path):
            if name.upper().startswith(ENV_PREFIX):
                names.setdefault(name.upper(), str(path))
    known = known_variables()
    warnings = []
    for name, source in sorted(names.items()):
        if name in known:
            continue
        guess = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f"; did you mean {guess[0]}?" if guess else "; see docs/reference/settings.md"
        warnings.append(f"unknown setting {name} (from {source}) is ignored{hint}")
    return warnings
