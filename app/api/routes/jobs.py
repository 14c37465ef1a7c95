"""Background job routes: poll, list and cancel fine-tune jobs.

Auth: **admin** keys only, reads included: jobs are the engineers' workflow (production lines only
predict), and job records carry training parameters and errors that mention store paths.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.audit import AUDITED
from app.api.deps import AdminDep, AuthFirstRoute, JobStoreDep
from app.api.responses import errors
from app.categories.service import CategoryService
from app.jobs.job_runner import JobRunner
from app.jobs.job_store import Job, JobNotFoundError, JobState
from app.schemas import JobList

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=AuthFirstRoute)
CANCEL_WAIT_S = 5.0  # a running job stops within one training step; wait that long for the final record


def get_job_runner(request: Request) -> JobRunner:
    """The app's ``JobRunner`` (``app.state.job_runner``)."""
    return request.app.state.job_runner


RunnerDep = Annotated[JobRunner, Depends(get_job_runner)]


@router.get("", response_model=JobList, summary="List fine-tune jobs", responses=errors(400, 401, 403, 422))
def list_jobs(
    _: AdminDep,
    jobs: JobStoreDep,
    category: Annotated[str | None, Query(description="Only this category's jobs.")] = None,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most jobs returned.")] = 100,
) -> JobList:
    """Jobs newest first, optionally filtered. Admin only."""
    if category is not None:
        category = CategoryService.name(category)
    return JobList(jobs=jobs.list(category=category, state=state, limit=limit))


@router.get("/{job_id}", response_model=Job, summary="One job's state and progress",
            responses=errors(401, 403, 404, 422))
def get_job(job_id: str, _: AdminDep, jobs: JobStoreDep) -> Job:
    """State, progress, validation metrics and error of one job. Admin only."""
    job = jobs.get(job_id)
    if job is None:
        raise JobNotFoundError(f"No job with id {job_id!r}.")
    return job


@router.delete("/{job_id}", dependencies=AUDITED, response_model=Job, summary="Cancel a job",
               responses={202: {"model": Job, "description": "A running job is still finishing its current step."},
                          **errors(401, 403, 404, 409, 422, e409="The job has already finished.")})
async def cancel_job(job_id: str, _: AdminDep, runner: RunnerDep, response: Response) -> Job:
    """Cancel a job: 200 with the final record, or 202 while a running job is still finishing its step.

    Admin only; 409 if the job already finished.
    """
    job = await run_in_threadpool(runner.cancel, job_id)
    if job.active:
        waited = await run_in_threadpool(runner.wait, job_id, CANCEL_WAIT_S)  # None: gone meanwhile
        job = waited or job
    response.status_code = 202 if job.active else 200
    return job
