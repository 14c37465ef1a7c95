"""Settings of the MQTT result publisher (line integration); part of the one ``Settings`` object.

Kept in their own file because they form one feature that most deployments leave off (``mqtt_host`` empty);
``Settings`` inherits them, so they come from ``CLIPSHOT_MQTT_*`` variables like every other setting and
appear in the same generated reference. ``clipshot watch`` reads the same variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

TRIGGER_PLACEHOLDERS = ("{line}", "{category}", "{camera}")


class MqttSettings(BaseModel):
    """Where and how verdicts are published (``app.serving.result_publisher``)."""

    mqtt_host: str | None = Field(
        None,
        description="MQTT broker host name or IP. Empty: no publishing. Set: every verdict is published as JSON "
        "(QoS 1) through an on-disk outbox (`mqtt-outbox.sqlite3` in the store) that keeps results while the "
        "broker is away and re-sends them in order; unreachable at start-up -> the service does not start.",
    )
    mqtt_port: int = Field(1883, ge=1, le=65535, description="MQTT broker port (usually 8883 with TLS).")
    mqtt_topic: str = Field(
        "clipshot/{line}/{category}/result",
        min_length=1,
        description="Topic template; `{line}`, `{category}` and `{camera}` are replaced (a `/`, `+` or `#` in a "
        "value becomes `_`).",
    )
    mqtt_line: str = Field(
        "default", min_length=1, max_length=128,
        description="Line name for results whose request named none (form field `line` or header `X-Clipshot-Line`).",
    )
    mqtt_retain: bool = Field(
        False, description="Publish with the retain flag, so the broker keeps the last result per topic (product) "
        "for subscribers that connect later."
    )
    mqtt_outbox_max: int = Field(
        100_000, ge=1, le=10_000_000,
        description="Most results the outbox holds while the broker is unreachable; beyond it the oldest are dropped "
        "(counted in `clipshot_mqtt_outbox_dropped_total`).",
    )
    mqtt_client_id: str | None = Field(
        None, max_length=128, description="MQTT client id; empty: `clipshot-<host name>-<pid>`."
    )
    mqtt_username: str | None = Field(None, description="MQTT user name; empty: connect anonymously.")
    mqtt_password: str | None = Field(None, repr=False, description="MQTT password (with `mqtt_username`).")
    mqtt_tls: bool = Field(False, description="Connect to the broker over TLS (verifying its certificate).")
    mqtt_ca_file: Path | None = Field(
        None, description="CA certificate(s) (PEM) that signed the broker's certificate; empty: the system's CAs."
    )
    mqtt_cert_file: Path | None = Field(None, description="Client certificate (PEM) for brokers that require one.")
    mqtt_key_file: Path | None = Field(None, description="Private key (PEM) of `mqtt_cert_file`.")
    mqtt_trigger_topic: str | None = Field(
        None,
        description="Topic template to take inspection triggers from, e.g. `clipshot/{line}/{category}/trigger` "
        "(each of `{line}`, `{category}`, `{camera}` a whole level, matched as `+`). Empty: no triggers. A "
        "message is JSON with `request_id` and `path` (under `mqtt_trigger_image_root`) or `image` (base64); "
        "its result (or error) is published like any other. See docs/integration.md.",
    )
    mqtt_trigger_image_root: Path | None = Field(
        None, description="Folder trigger messages may name images in (relative paths are taken from it; paths "
        "outside it are refused); empty: only `image` (base64) triggers."
    )
    mqtt_trigger_share_group: str | None = Field(
        "clipshot", max_length=64, pattern=r"^[^/+#]*$",
        description="Subscribe as `$share/<group>/<topic>`, so that several replicas (or services) on one "
        "broker split the triggers instead of each inspecting every one; empty: a plain subscription (brokers "
        "without shared subscriptions).",
    )
    mqtt_connect_timeout_s: float = Field(
        5.0, gt=0, le=300, description="How long start-up waits for the broker's answer before giving up (s)."
    )

    @field_validator("mqtt_host", "mqtt_client_id", "mqtt_username", "mqtt_password", "mqtt_ca_file",
                     "mqtt_cert_file", "mqtt_key_file", "mqtt_trigger_topic", "mqtt_trigger_image_root",
                     "mqtt_trigger_share_group", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("mqtt_topic", mode="after")
    @classmethod
    def _check_topic(cls, v: str) -> str:
        if "+" in v or "#" in v or "\x00" in v:
            raise ValueError("a publish topic must not contain the wildcards + or #")
        try:
            v.format(line="l", category="c", camera="k")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{line}}, {{category}} and {{camera}} may be used in the topic ({exc})") from None
        return v

    @field_validator("mqtt_trigger_topic", mode="after")
    @classmethod
    def _check_trigger_topic(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "+" in v or "#" in v or "\x00" in v or v.startswith("$"):
            raise ValueError("a trigger topic must not contain + or # (placeholders become +) nor start with $")
        for level in v.split("/"):
            if "{" in level and level not in TRIGGER_PLACEHOLDERS:
                raise ValueError(f"{{line}}, {{category}} and {{camera}} must each be a whole topic level "
                                 f"(got {level!r})")
        return v

    @model_validator(mode="after")
    def _check_mqtt(self) -> MqttSettings:
        if self.mqtt_trigger_topic and not self.mqtt_host:
            raise ValueError("mqtt_trigger_topic needs mqtt_host")
        if (self.mqtt_ca_file or self.mqtt_cert_file or self.mqtt_key_file) and not self.mqtt_tls:
            raise ValueError("mqtt_ca_file, mqtt_cert_file and mqtt_key_file need mqtt_tls=true")
        if bool(self.mqtt_cert_file) != bool(self.mqtt_key_file):
            raise ValueError("mqtt_cert_file and mqtt_key_file go together")
        if self.mqtt_password and not self.mqtt_username:
            raise ValueError("mqtt_password needs mqtt_username")
        return self
