"""Settings of the OPC UA server (line integration); part of the one ``Settings`` object.

Kept in their own file for the same reason as the MQTT ones: one optional feature (``opcua_endpoint`` empty =
off), inherited by ``Settings`` so they come from ``CLIPSHOT_OPCUA_*`` variables and appear in the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import NoDecode

UserList = Annotated[list[str], NoDecode]


class OpcUaSettings(BaseModel):
    """The OPC UA server a PLC reads results from (``app.serving.opcua_server``)."""

    opcua_endpoint: str | None = Field(
        None,
        description="OPC UA endpoint to serve, e.g. `opc.tcp://0.0.0.0:4840/clipshot/`. Empty: no OPC UA server. "
        "Set: an object per product under `Objects/Clipshot` with the last result, a `ResultReady` event per "
        "result, and the methods `GetLatestResult` and `InspectImage` (needs the `line` extra: asyncua).",
    )
    opcua_users: UserList = Field(
        default_factory=list,
        repr=False,
        description="`user:password` pairs allowed to connect, comma-separated. Needed unless "
        "`opcua_allow_anonymous`. The endpoint has no transport encryption (security policy None): keep it on "
        "the machine network.",
    )
    opcua_allow_anonymous: bool = Field(False, description="Let OPC UA clients connect without a user (off by "
                                        "default).")
    opcua_image_root: Path | None = Field(
        None, description="Folder `InspectImage` may read images from (paths outside it are refused); empty: the "
        "method refuses every path."
    )

    @field_validator("opcua_endpoint", "opcua_image_root", mode="before")
    @classmethod
    def _empty_opcua(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("opcua_endpoint", mode="after")
    @classmethod
    def _check_endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("opc.tcp://"):
            raise ValueError("the OPC UA endpoint must look like opc.tcp://host:port/path")
        return v

    @field_validator("opcua_users", mode="before")
    @classmethod
    def _parse_users(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [item.strip() for item in v.split(",") if item.strip()]
        for item in v or []:
            if not isinstance(item, str) or ":" not in item or item.startswith(":") or item.endswith(":"):
                raise ValueError("each OPC UA user must be `name:password`")
        return v or []

    @model_validator(mode="after")
    def _check_opcua(self) -> OpcUaSettings:
        if self.opcua_endpoint and not self.opcua_users and not self.opcua_allow_anonymous:
            raise ValueError("opcua_endpoint needs opcua_users (or opcua_allow_anonymous=true)")
        return self
