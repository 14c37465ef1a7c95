"""The ``wait=false`` path of the refit routes (register, feedback, shot removal): check, admit, answer 202.

Why one helper: the three routes must refuse exactly what their synchronous form refuses before anything is
stored (names, labels, images decoded, limits, geometry) and only then answer 202 with the job, holding the
fit's share of the pixel budget from the check until the job ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse

from app.jobs.job_store import Job, JobKind
from app.jobs.refit_jobs import RefitJobs, RefitProgress
from app.serving.pixel_budget import PixelBudget, fit_admitted

WAIT_DOC = ("true (default): answer when the new version serves. false: check everything first (a bad request "
            "is refused now, nothing stored), then answer 202 with a job to follow at GET /v1/jobs/{id} (stage, "
            "done/total, and when it succeeded the body this call answers, in `result`).")
WaitQuery = Annotated[bool, Query(description=WAIT_DOC)]
ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {"model": Job, "description": "`wait=false`: the refit job, started (follow it at `GET /v1/jobs/{id}`)."}}


def get_refit_jobs(request: Request) -> RefitJobs:
    """The app's ``RefitJobs`` (``app.state.refit_jobs``)."""
    return request.app.state.refit_jobs


RefitsDep = Annotated[RefitJobs, Depends(get_refit_jobs)]


async def start_refit(refits: RefitJobs, budget: PixelBudget, pixels: int, *, kind: JobKind,
                      params: dict[str, Any], check: Callable[[], Awaitable[str]],
                      refit: Callable[[RefitProgress], Awaitable[dict[str, Any]]]) -> JSONResponse:
    """413 / 503 from the budget, 4xx from ``check`` (the category name on success), else 202 with the job."""
    admitted = contextlib.AsyncExitStack()
    await admitted.enter_async_context(fit_admitted(budget, pixels))

    async def held(progress: RefitProgress) -> dict[str, Any]:
        async with admitted:  # the budget goes back when the fit ends, however it ends
            return await refit(progress)

    try:
        name = await check()
        job = await refits.start(name, kind, params, held)
    except BaseException:
        await admitted.aclose()
        raise
    return JSONResponse(job.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})
