"""Inspections triggered over MQTT: a PLC or camera publishes ``{"request_id", "path" | "image", ...}`` to the
trigger topic, the service scores the image and publishes the result, with that ``request_id``, like any other.

Why it is built this way: the message arrives on paho's network thread, which must keep acknowledging the
results being published, so it only parses and hands the work to the service's event loop; the inspection
itself is ``line_inspect.inspect_image``, the code path of the OPC UA ``InspectImage`` method, which calls the
same inference and ``deliver`` as the HTTP predict routes. A message that cannot be inspected (bad JSON, a path
outside ``mqtt_trigger_image_root``, an unknown product, not an image) gets a published *error result*
(``verdict: "error"`` and the API's ``error`` object) so the line sees why, never a crash or silence. QoS 1 may
deliver a trigger twice, and a PLC may re-send it: a bounded memory of recent ``request_id``s makes sure each is
inspected once (per process; shared subscriptions give each trigger to one process).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import json
import logging
import re
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.core.config import Settings, env_var
from app.serving.line_inspect import InspectError, inspect_image, read_confined
from app.serving.result_publisher import LineContext, ResultPublisher, record_messages

log = logging.getLogger(__name__)
REMEMBERED_IDS = 10_000  # request ids kept for de-duplication: hours of a fast line, about a megabyte
MAX_PENDING = 256  # triggers being inspected at once; beyond it the line is told `overloaded`
SUBSCRIBE_TIMEOUT_S = 10.0
VALUE = r"^[^\x00-\x1f\x7f]{1,128}$"  # as the HTTP line fields: printable, one line, bounded


class TriggerMessage(BaseModel):
    """The JSON body of a trigger (unknown fields are refused, so a typo is not silently ignored)."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(pattern=VALUE)
    path: str | None = Field(None, max_length=4096)
    image: str | None = None  # base64 image bytes
    category: str | None = Field(None, pattern=VALUE)
    part_id: str | None = Field(None, pattern=VALUE)
    line: str | None = Field(None, pattern=VALUE)
    camera: str | None = Field(None, pattern=VALUE)

    @model_validator(mode="after")
    def _one_source(self) -> TriggerMessage:
        if (self.path is None) == (self.image is None):
            raise ValueError("give exactly one of `path` (an image file) and `image` (base64 bytes)")
        return self


def subscription(settings: Settings) -> str:
    """The topic filter: each placeholder level becomes ``+``; under ``$share/<group>/`` when a group is set."""
    assert settings.mqtt_trigger_topic
    levels = ["+" if level.startswith("{") else level for level in settings.mqtt_trigger_topic.split("/")]
    group = settings.mqtt_trigger_share_group
    return (f"$share/{group}/" if group else "") + "/".join(levels)


def topic_fields(template: str, topic: str) -> dict[str, str]:
    """``{"line": …, "category": …, "camera": …}`` as far as the template names them in ``topic``."""
    return {level[1:-1]: value for level, value in zip(template.split("/"), topic.split("/"), strict=False)
            if level.startswith("{")}


class RecentIds:
    """The last ``capacity`` ids seen, oldest forgotten first: ``add`` is False for an id already there."""

    def __init__(self, capacity: int = REMEMBERED_IDS) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> bool:
        if key in self._ids:
            self._ids.move_to_end(key)
            return False
        self._ids[key] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._ids)


class TriggerListener:
    """Subscribes on the publisher's connection; each message becomes one task on ``loop``."""

    def __init__(self, state: Any, publisher: ResultPublisher, loop: asyncio.AbstractEventLoop) -> None:
        self.state, self.publisher, self.loop = state, publisher, loop
        self.settings: Settings = state.settings
        self.seen = RecentIds()  # touched on the event loop only
        self._pending: set[concurrent.futures.Future[None]] = set()

    def start(self) -> None:
        """Subscribe (blocking until the broker's SUBACK; raises ``PublisherConfigError`` if refused)."""
        root = self.settings.mqtt_trigger_image_root
        if root is not None and not root.is_dir():
            from app.serving.result_publisher import PublisherConfigError

            raise PublisherConfigError(f"{root} is not a folder; check {env_var('mqtt_trigger_image_root')}")
        self.publisher.subscribe(subscription(self.settings), self._on_message, SUBSCRIBE_TIMEOUT_S)

    async def stop(self) -> None:
        """Take no more triggers and let the ones being inspected finish (their results go to the outbox)."""
        await asyncio.to_thread(self.publisher.unsubscribe)
        if self._pending:
            await asyncio.wait([asyncio.wrap_future(f) for f in list(self._pending)], timeout=30)

    def _on_message(self, topic: str, payload: bytes) -> None:  # paho's network thread
        future = asyncio.run_coroutine_threadsafe(self.handle(topic, payload), self.loop)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def handle(self, topic: str, payload: bytes) -> None:
        """Inspect one trigger and publish its result, or publish why it could not be inspected."""
        assert self.settings.mqtt_trigger_topic
        fields = topic_fields(self.settings.mqtt_trigger_topic, topic)
        message: TriggerMessage | None = None
        try:
            if len(payload) > self.settings.max_request_bytes:
                raise InspectError("payload_too_large", f"the trigger has {len(payload)} bytes; at most "
                                   f"{self.settings.max_request_bytes} ({env_var('max_request_bytes')})")
            message = _parse(payload)
            fields = _merge(fields, message)
            if not self.seen.add(message.request_id):
                log.info("trigger %s seen before: not inspected again", message.request_id)
                return
            if len(self._pending) > MAX_PENDING:
                raise InspectError("overloaded", f"more than {MAX_PENDING} triggers are being inspected")
            if "category" not in fields:
                raise InspectError("validation_error", "name the product: `category` in the message or the topic")
            data, name = await self._image(message)
            context = LineContext(part_id=message.part_id or Path(name).stem, line=fields.get("line"),
                                  camera=fields.get("camera"))
            await inspect_image(self.state, fields["category"], data, name, context, message.request_id)
        except InspectError as exc:
            rid = message.request_id if message else getattr(exc, "request_id", None)
            await self._publish_error(fields, message, rid, exc.code, exc.message)
        except Exception:  # a bug here must reach the line as an error result, not kill the listener
            log.exception("trigger on %s failed", topic)
            await self._publish_error(fields, message, message.request_id if message else None, "internal_error",
                                      "the inspection failed; see the log")

    async def _image(self, message: TriggerMessage) -> tuple[bytes, str]:
        if message.path is not None:
            return await read_confined(self.settings.mqtt_trigger_image_root, message.path,
                                       env_var("mqtt_trigger_image_root"), self.settings.max_upload_bytes)
        try:
            return base64.b64decode(message.image or "", validate=True), f"{message.request_id}.image"
        except (binascii.Error, ValueError) as exc:
            raise InspectError("validation_error", f"`image` is not base64: {exc}") from exc

    async def _publish_error(self, fields: dict[str, str], message: TriggerMessage | None, request_id: str | None,
                             code: str, text: str) -> None:
        log.warning("trigger %s refused: %s (%s)", request_id or "?", text, code)
        record = {
            "message_id": str(uuid.uuid4()), "request_id": request_id,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "category": fields.get("category") or "_", "part_id": message.part_id if message else None,
            "line": fields.get("line") or self.settings.mqtt_line, "camera": fields.get("camera"),
            "verdict": "error", "error": {"code": code, "message": text},
        }
        await asyncio.to_thread(self.publisher.submit, record_messages(self.settings, [record]))


class BadTrigger(InspectError):
    """A message that is not a valid trigger; ``request_id`` is its id when that much could be read."""

    def __init__(self, message: str, request_id: str | None) -> None:
        super().__init__("validation_error", message)
        self.request_id = request_id


def _parse(payload: bytes) -> TriggerMessage:
    try:
        body = json.loads(payload)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadTrigger(f"bad trigger message: not JSON ({exc})", None) from exc
    try:
        return TriggerMessage.model_validate(body)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        rid = body.get("request_id") if isinstance(body, dict) else None
        usable = isinstance(rid, str) and re.fullmatch(VALUE, rid)  # so the line can tell which trigger it was
        raise BadTrigger(f"bad trigger message: {detail}", rid if usable else None) from exc


def _merge(fields: dict[str, str], message: TriggerMessage) -> dict[str, str]:
    """The topic's line/category/camera with the message's; the two must agree where both name one."""
    merged = dict(fields)
    for name in ("line", "category", "camera"):
        value = getattr(message, name)
        if value is not None:
            if name in fields and fields[name] != value:
                raise InspectError("validation_error", f"`{name}` is {value!r} in the message but {fields[name]!r} "
                                   "in the topic")
            merged[name] = value
    return merged


def start_trigger(state: Any, publisher: ResultPublisher, loop: asyncio.AbstractEventLoop) -> TriggerListener:
    """The subscribed listener (call from a worker thread: subscribing waits for the broker)."""
    listener = TriggerListener(state, publisher, loop)
    listener.start()
    return listener
