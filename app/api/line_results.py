"""The predict routes' one hook to the line: where the image came from in, the verdicts out to the broker.

A line names the part, line and camera of an image in form fields (``part_id``, ``line``, ``camera``) or in
headers (``X-Clipshot-Part-Id``, ``X-Clipshot-Line``, ``X-Clipshot-Camera``; handy when the client cannot add
form fields). They are checked *before* the prediction runs, so a bad value costs no inference, and the
answer is handed to the line outputs afterwards: the MQTT results are written to the publisher's outbox (a
local SQLite insert, so a result the client saw survives a crash) and the OPC UA update is scheduled; neither
waits for a broker or a PLC, and a failure there is logged, never turned into an error for the prediction.
The inspection record (``app.records``) gets the same answer and origin through its non-blocking queue.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable

from fastapi import Request
from starlette.datastructures import UploadFile

from app.api.request_id import current_request_id
from app.errors import ClipshotHTTPError
from app.schemas.prediction import PredictResponse
from app.serving.result_publisher import LineContext, deliver

log = logging.getLogger(__name__)
FIELDS = ("part_id", "line", "camera")
HEADER = {name: "x-clipshot-" + name.replace("_", "-") for name in FIELDS}
_VALUE = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")  # printable, one line, bounded: it goes into topics and logs


async def line_context(request: Request) -> LineContext:
    """The part id, line and camera of a predict request (form field or header; both must agree)."""
    form = await request.form()  # already parsed for the files: no second read of the body
    values: dict[str, str | None] = {}
    for name in FIELDS:
        field, header = form.get(name), request.headers.get(HEADER[name])
        if field is not None and not isinstance(field, str):
            raise ClipshotHTTPError(f"`{name}` must be a text field, not a file", code="validation_error",
                                    status_code=422)
        if field is not None and header is not None and field != header:
            raise ClipshotHTTPError(f"`{name}` given as form field and header with different values",
                                    code="validation_error", status_code=422)
        value = field if field is not None else header
        if value is not None and not _VALUE.fullmatch(value):
            raise ClipshotHTTPError(f"`{name}` must be 1-128 printable characters on one line",
                                    code="validation_error", status_code=422)
        values[name] = value
    return LineContext(**values)


async def published(request: Request, prediction: Awaitable[PredictResponse]) -> PredictResponse:
    """Await ``prediction`` and hand its verdicts to the result publisher, if one is configured."""
    try:
        context = await line_context(request)
    except ClipshotHTTPError:
        if hasattr(prediction, "close"):
            prediction.close()  # the coroutine never ran: close it instead of leaving it un-awaited
        raise
    answer = await prediction
    await deliver(request.app.state, answer, context, current_request_id())
    await _record(request, answer, context)
    return answer


async def _record(request: Request, answer: PredictResponse, context: LineContext) -> None:
    """Queue the answer for the inspection record, with the uploaded bytes when images are kept."""
    records = getattr(request.app.state, "records", None)
    if records is None or records.mode == "off":
        return
    try:
        uploads = None
        if records.needs_uploads(answer):
            uploads = []
            for upload in (await request.form()).getlist("files"):
                if isinstance(upload, UploadFile):  # the request is still open: its spooled files are readable
                    await upload.seek(0)
                    uploads.append(await upload.read())
        records.record(answer, context, current_request_id(), uploads)
    except Exception:  # the answer is made: a recording bug must not turn it into a 500
        log.exception("could not queue the answer for the inspection record")
