"""The Ray router's body budget (``app.distributed.body_budget``) on a real loopback socket: bodies held until
their answer count against one budget, and a request that would pass it is refused at once with the documented
503 + Retry-After, before its body is read. The endpoint below stands in for the router's wait on its replica."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.distributed.body_budget import BodyBudget
from app.errors import ClipshotHTTPError
from tests.helpers.waiting import wait_until
from tests.threaded_server import threaded_server

MB = 1_000_000
LIMIT, PER_REQUEST = 3 * MB, 2 * MB  # two 1.5 MB bodies fit together, a third body does not


def _app(budget: BodyBudget, gate: threading.Event) -> Starlette:
    async def hold(request: Request) -> JSONResponse:
        try:
            async with budget.hold(request) as body:
                while not gate.is_set():  # the replica has not answered yet: the body stays held
                    await asyncio.sleep(0.01)
                return JSONResponse({"bytes": len(body)})
        except ClipshotHTTPError as exc:
            return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    return Starlette(routes=[Route("/", hold, methods=["POST"])])


def test_bodies_in_flight_stay_within_the_budget_and_the_next_gets_503_with_retry_after():
    budget, gate = BodyBudget(LIMIT, PER_REQUEST), threading.Event()
    with threaded_server(None, app=_app(budget, gate)) as url, ThreadPoolExecutor(4) as pool, \
            httpx.Client(base_url=url, timeout=30) as client:
        held = [pool.submit(client.post, "/", content=b"x" * (3 * MB // 2)) for _ in range(2)]
        assert wait_until(lambda: budget.held == 3 * MB, timeout=20)
        refused = client.post("/", content=b"y" * MB)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "router_full"
        assert budget.held == 3 * MB  # the refused body reserved nothing

        def chunked():  # no Content-Length: reserved chunk by chunk, refused once past the budget
            yield b"z" * (MB // 2)
            yield b"z" * (MB // 2)
        assert client.post("/", content=chunked()).status_code == 503
        too_large = client.post("/", content=b"w" * (PER_REQUEST + 1))
        assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"
        gate.set()
        assert [f.result().json()["bytes"] for f in held] == [3 * MB // 2] * 2
        assert budget.held == 0  # every reservation returned with its answer
        assert client.post("/", content=b"y" * MB).json() == {"bytes": MB}
