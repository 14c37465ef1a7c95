"""Generate the torch-free client's models (``clients/python/clipshot_client/models.py``) from the OpenAPI schema.

Why generated: a line PC installs the client with httpx and pydantic only, so it cannot import ``app.schemas``;
a hand-kept copy would drift. The service's own OpenAPI schema is the single source, and a test regenerates
the file and fails when the committed one differs:

    python -m app.api.client_models > clients/python/clipshot_client/models.py

The models accept fields a newer service adds (``extra="allow"``) and check types but not ranges: the service
validated the values already.
"""

from __future__ import annotations

import keyword
from typing import Any

from app.core.config import Settings

HEADER = '''"""Response models of the clipshot HTTP API, generated from the service's OpenAPI schema; do not edit.

Regenerate with ``python -m app.api.client_models > clients/python/clipshot_client/models.py`` (in the clipshot
repository); a test there fails when this file and the service's schema disagree.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
'''


def _ref(schema: dict[str, Any]) -> str:
    return schema["$ref"].rsplit("/", 1)[-1]


def _type(schema: dict[str, Any]) -> str:
    """The Python annotation for one JSON schema."""
    if "$ref" in schema:
        return _ref(schema)
    if "anyOf" in schema:
        parts = [_type(s) for s in schema["anyOf"]]
        return " | ".join(dict.fromkeys(p for p in parts if p != "None")) + (" | None" if "None" in parts else "")
    if "const" in schema:
        return f"Literal[{schema['const']!r}]"
    if "enum" in schema:
        return "Literal[" + ", ".join(repr(v) for v in schema["enum"]) + "]"
    kind = schema.get("type")
    if kind == "string":
        return "datetime" if schema.get("format") == "date-time" else "str"
    if kind == "array":
        return f"list[{_type(schema.get('items', {}))}]"
    return {"integer": "int", "number": "float", "boolean": "bool", "null": "None",
            "object": "dict[str, Any]"}.get(kind or "", "Any")


def _default(schema: dict[str, Any]) -> str:
    return repr(schema.get("default"))  # pydantic copies a mutable default per instance


def _model(name: str, schema: dict[str, Any]) -> list[str]:
    doc = " ".join((schema.get("description") or name).split())
    if "enum" in schema:
        lines = [f"class {name}(StrEnum):", f'    """{doc}"""', ""]
        return lines + [f"    {str(v).upper()} = {v!r}" for v in schema["enum"]]
    lines = [f"class {name}(_Model):", f'    """{doc}"""', ""]
    required = set(schema.get("required", ()))
    for field, sub in schema.get("properties", {}).items():
        attr = field + "_" if keyword.iskeyword(field) else field
        annotation = _type(sub)
        if field in required:
            lines.append(f"    {attr}: {annotation}")
        else:
            default = _default(sub)
            if default == "None" and "None" not in annotation.split(" | "):
                annotation += " | None"
            lines.append(f"    {attr}: {annotation} = {default}")
    return lines


def render_client_models(spec: dict[str, Any] | None = None) -> str:
    """The models module for every response schema (request bodies ``Body_*`` are the client's to build)."""
    if spec is None:
        from app.main import create_app

        spec = create_app(Settings(_env_file=None, insecure_dev=True)).openapi()
    schemas = spec["components"]["schemas"]
    parts = [HEADER]
    for name in sorted(schemas):
        if not name.startswith("Body_"):
            parts.append("\n\n" + "\n".join(_model(name, schemas[name])) + "\n")
    return "".join(parts)


if __name__ == "__main__":
    print(render_client_models(), end="")
