"""The bundle manifest: what a bundle was built from, so it can be validated before use.

The manifest is the only place that ties a tensor file to its backbone, its shots and its checksum.
It is frozen and ``extra="forbid"`` so a typo in a field name fails at save time, not months later.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from .errors import BundleCorrupt, InvalidInput, UnsupportedSchema

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})

Kind = Literal["category", "generic"]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

# Fields the store owns: callers may omit them; whatever they pass is replaced (category/kind must agree).
STORE_FIELDS = ("schema_version", "category", "version", "created", "tensors_sha256", "kind")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BackboneRef(_Frozen):
    """Identifies the frozen backbone; a bundle is only valid on the exact weights it was fitted on."""

    spec: str = Field(min_length=1)
    sha256: Sha256
    # Compute precision the memory bank and threshold were made at (absent in bundles before it was recorded);
    # loading at another precision works but draws a warning, since scores shift slightly.
    precision: Literal["fp32", "fp16", "bf16"] | None = None
    # Which runtime computed the features the memory bank and threshold were made from (absent: torch, before it
    # was recorded); features agree across runtimes within clipshot.runtimes.EXPORT_TOLERANCE, so any may serve it.
    runtime: Literal["torch", "onnxruntime", "openvino"] | None = None


class ShotRef(_Frozen):
    """One image of the category's evidence: a good shot the memory was fitted on, or (in ``validation``) an
    operator-confirmed defect. ``name`` is the file in ``shots/``; the rest says where it came from, so the
    version alone tells which images belong to the category (files no version lists are orphans)."""

    name: str = Field(min_length=1)
    sha256: Sha256
    file_name: str | None = Field(None, max_length=255)  # the name it was uploaded under
    added_at: AwareDatetime | None = None
    source: Literal["registration", "feedback"] = "registration"
    label: Literal["good", "defect"] = "good"
    defect_type: str | None = Field(None, max_length=64)
    note: str | None = Field(None, max_length=500)


class TrainingInfo(BaseModel):
    """How the adapter was trained; extra keys are allowed because training recipes evolve."""

    model_config = ConfigDict(frozen=True, extra="allow")

    config: dict[str, Any] = Field(default_factory=dict)
    seconds: float = Field(ge=0)


class Manifest(_Frozen):
    """Schema-versioned description of one bundle version (``manifest.json``)."""

    schema_version: int
    category: str
    version: int = Field(ge=1)
    created: AwareDatetime
    backbone: BackboneRef
    adapter: dict[str, Any] = Field(default_factory=dict)
    shots: list[ShotRef] = Field(default_factory=list)
    validation: list[ShotRef] = Field(default_factory=list)  # confirmed defects: scored, never in memory
    training: TrainingInfo | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    promotable: bool = False
    tensors_sha256: Sha256
    kind: Kind = "category"


def build_manifest(
    partial: dict[str, Any], *, name: str, kind: Kind, version: int, tensors_sha256: str
) -> Manifest:
    """Fill the store-owned fields into the caller's partial manifest and validate the result.

    Also checks the result serialises to JSON, so a non-JSON value in ``adapter``/``metrics``
    fails here, before anything is written.
    """
    if not isinstance(partial, dict):
        raise InvalidInput(f"manifest must be a dict, got {type(partial).__name__}")
    for key, expected in (("category", name), ("kind", kind)):
        if key in partial and partial[key] != expected:
            raise InvalidInput(
                f"manifest field {key!r} is {partial[key]!r} but the bundle is being saved as {expected!r}; "
                f"drop the field (the store fills it) or save under the right name"
            )
    fields = dict(partial)
    fields.update(
        schema_version=SCHEMA_VERSION,
        category=name,
        version=version,
        created=datetime.now(UTC),
        tensors_sha256=tensors_sha256,
        kind=kind,
    )
    try:
        manifest = Manifest.model_validate(fields)
        manifest.model_dump_json()
    except (ValidationError, ValueError, TypeError) as exc:
        raise InvalidInput(f"invalid manifest for {name!r}: {exc}") from exc
    return manifest


def dump_manifest(manifest: Manifest) -> bytes:
    """Serialise for ``manifest.json`` (indented, so operators can read it)."""
    return (manifest.model_dump_json(indent=2) + "\n").encode("utf-8")


def parse_manifest(raw: bytes, *, where: str) -> Manifest:
    """Parse ``manifest.json``; the schema version is checked first so newer files fail clearly."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleCorrupt(f"{where}: manifest.json is not valid JSON ({exc}); re-save the bundle") from exc
    if not isinstance(data, dict):
        raise BundleCorrupt(f"{where}: manifest.json must hold a JSON object; re-save the bundle")
    schema = data.get("schema_version")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema not in SUPPORTED_SCHEMA_VERSIONS:
        raise UnsupportedSchema(
            f"{where}: manifest schema_version {schema!r} is not supported "
            f"(this code reads {sorted(SUPPORTED_SCHEMA_VERSIONS)}); upgrade clipshot or re-save the bundle"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise BundleCorrupt(f"{where}: manifest.json fails validation: {exc}") from exc
