"""One image from the line, inspected like an HTTP prediction: the OPC UA ``InspectImage`` method and the MQTT
trigger topic both come through here.

Why one path: a verdict must not depend on which door the image came in by. So the bytes go to the same
``InferenceService.predict_category`` as an upload (same size and pixel limits, same adapter, same batching),
and the answer to the same ``deliver`` as the HTTP routes (MQTT outbox, OPC UA nodes and event). Image paths
are only read inside the folder the operator named (``confined``): a PLC or a broker message must not be able
to make the service read ``/etc/shadow`` or another line's images.
"""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import Any

from starlette.datastructures import UploadFile

from app.errors import ClipshotHTTPError
from app.serving.result_publisher import LineContext, deliver

log = logging.getLogger(__name__)


class InspectError(Exception):
    """The image could not be inspected; ``code`` is the API's error code for the same failure."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def confined(root: Path | None, path: str, setting: str) -> Path:
    """``path`` (absolute, or relative to ``root``) as a file inside ``root``, symlinks resolved; else raises
    ``InspectError`` (``path_not_allowed`` when it points outside or no root is set, ``image_not_found``)."""
    if root is None:
        raise InspectError("path_not_allowed", f"image paths are refused: {setting} names no folder")
    if not path or "\x00" in path:
        raise InspectError("path_not_allowed", "the image path is empty")
    base = root.resolve()
    target = (base / path).resolve()  # an absolute `path` replaces `base`; `..` and symlinks are resolved
    if not target.is_relative_to(base):
        raise InspectError("path_not_allowed", f"{path} is outside the folder images may be read from ({setting})")
    if not target.is_file():
        raise InspectError("image_not_found", f"no image file at {path}")
    return target


async def read_confined(root: Path | None, path: str, setting: str, max_bytes: int) -> tuple[bytes, str]:
    """The bytes and file name of an image under ``root``; larger than ``max_bytes`` is refused unread."""
    target = confined(root, path, setting)
    size = target.stat().st_size
    if size > max_bytes:
        raise InspectError("payload_too_large", f"{path} has {size} bytes; at most {max_bytes} are read")
    return await asyncio.to_thread(target.read_bytes), target.name


async def inspect_image(state: Any, category: str, data: bytes, filename: str, context: LineContext,
                        request_id: str | None) -> list[dict[str, Any]]:
    """Score ``data`` against ``category``'s active adapter and hand the result to every line output; returns
    the records as published. A refusal the HTTP route would answer with an error raises ``InspectError``."""
    upload = UploadFile(io.BytesIO(data), filename=filename, size=len(data))
    try:
        answer = await state.inference.predict_category(category, [upload], "regions")
    except ClipshotHTTPError as exc:
        raise InspectError(exc.code, exc.message) from exc
    return await deliver(state, answer, context, request_id)
