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
POLICIES = ("Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign", "None")


class OpcUaSettings(BaseModel):
    """The OPC UA server a PLC reads results from (``app.serving.opcua_server``)."""

    opcua_endpoint: str | None = Field(
        None,
        description="OPC UA endpoint to serve, e.g. `opc.tcp://0.0.0.0:4840/clipshot/`. Empty: no OPC UA server. "
        "Set: an object per product under `Objects/Clipshot` with the last result, a `ResultReady` event per "
        "result, and the methods `GetLatestResult` and `InspectImage` (needs the `line` extra: asyncua).",
    )
    opcua_security_policies: UserList = Field(
        default_factory=lambda: ["Basic256Sha256_SignAndEncrypt"],
        description="Security policies the endpoint offers, comma-separated, from `Basic256Sha256_SignAndEncrypt` "
        "(default), `Basic256Sha256_Sign` and `None`. Basic256Sha256 needs `opcua_certificate`, "
        "`opcua_private_key` and `opcua_trusted_clients`; `None` (no signing, no encryption, passwords readable "
        "on the wire) only on a closed machine network.",
    )
    opcua_certificate: Path | None = Field(
        None, description="The server's application instance certificate (PEM or DER, RSA 2048-4096 bits); its "
        "subjectAltName URI becomes the server's ApplicationUri."
    )
    opcua_private_key: Path | None = Field(
        None, description="Unencrypted private key (PEM or DER) of `opcua_certificate`; readable by the service "
        "only."
    )
    opcua_trusted_clients: Path | None = Field(
        None, description="Folder of trusted client certificates (and CA certificates that signed them), `.der`, "
        "`.pem`, `.crt` or `.cer`; a client whose certificate is not trusted there is refused. Read at start-up."
    )
    opcua_users: UserList = Field(
        default_factory=list,
        repr=False,
        description="`user:password` pairs allowed to connect, comma-separated; the password may be a "
        "`mosquitto_passwd` hash (`$7$…`) instead of plain text. Prefer `opcua_users_file`.",
    )
    opcua_users_file: Path | None = Field(
        None, description="Users file in Mosquitto's password-file format (`user:$7$…` lines, made with "
        "`mosquitto_passwd -c FILE USER` or `python -m app.serving.opcua_security USER`). One of "
        "`opcua_users`, `opcua_users_file` or `opcua_allow_anonymous` is needed with `opcua_endpoint`."
    )
    opcua_allow_anonymous: bool = Field(False, description="Let OPC UA clients connect without a user (off by "
                                        "default).")
    opcua_image_root: Path | None = Field(
        None, description="Folder `InspectImage` may read images from (paths outside it are refused); empty: the "
        "method refuses every path."
    )

    @field_validator("opcua_endpoint", "opcua_image_root", "opcua_certificate", "opcua_private_key",
                     "opcua_trusted_clients", "opcua_users_file", mode="before")
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

    @field_validator("opcua_security_policies", mode="before")
    @classmethod
    def _parse_policies(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [item.strip() for item in v.split(",") if item.strip()]
        unknown = [item for item in v or [] if item not in POLICIES]
        if unknown or not v:
            raise ValueError(f"security policies must be some of {', '.join(POLICIES)} (got {unknown or 'none'})")
        return list(dict.fromkeys(v))

    @property
    def opcua_secure(self) -> bool:
        """Whether the endpoint offers a Basic256Sha256 policy (and so needs the certificate files)."""
        return any(policy != "None" for policy in self.opcua_security_policies)

    @model_validator(mode="after")
    def _check_opcua(self) -> OpcUaSettings:
        if not self.opcua_endpoint:
            return self
        if not (self.opcua_users or self.opcua_users_file or self.opcua_allow_anonymous):
            raise ValueError("opcua_endpoint needs opcua_users or opcua_users_file (or opcua_allow_anonymous=true)")
        if self.opcua_secure and not (self.opcua_certificate and self.opcua_private_key and
                                      self.opcua_trusted_clients):
            raise ValueError("opcua_security_policies with Basic256Sha256 need opcua_certificate, opcua_private_key "
                             "and opcua_trusted_clients (or opcua_security_policies=None on a closed network)")
        return self
