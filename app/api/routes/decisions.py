"""Decision routes of a product: threshold policy, operator feedback, its shot list and its score distributions.

Auth: changes need an **admin** key; listing the shots and the score distributions accepts a client key too
(hashes, file names and scores, like the category detail and the inspection record). Every change answers with
the new version it made, so the line can trace which rule judged a part and roll back with
``POST .../versions/{v}/activate``. Rules live in ``CategoryService`` (``app/categories/category_edits.py``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, File, Form, Path, Query, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.api.audit import AUDITED
from app.api.deps import AdminDep, AuthFirstRoute, ClientDep, PixelBudgetDep, SettingsDep
from app.api.refit_route import ACCEPTED, RefitsDep, WaitQuery, start_refit
from app.api.responses import errors
from app.api.routes.categories import CategoriesDep, CategoryPath
from app.api.routes.records import RecordsDep
from app.categories.category_edits import policy_from_request
from app.categories.score_evidence import recorded_effect
from app.categories.service import CategoryService
from app.jobs.refit_jobs import RefitProgress
from app.records.service import RecordService
from app.schemas import (
    FeedbackResult,
    RecordedEffect,
    ScoreDistributions,
    ShotList,
    ShotRemoved,
    ThresholdChanged,
    ThresholdRequest,
)
from app.serving.pixel_budget import fit_admitted, upload_pixels

router = APIRouter(prefix="/v1/categories", tags=["categories"], route_class=AuthFirstRoute)

_DRY_RUN_DOC = ("Preview: answer with the decision, its `warnings` and what it would flag among the recorded "
                "inspections (`recorded`) without changing anything (the console asks the operator before "
                "applying a rule that warns).")
# Recorded scores a histogram or a preview counts: enough for shares to 0.1 %, few enough for one quick answer.
RECORDED_DEFAULT = 1000
RECORDED_MAX = 10_000
Sha256Path = Annotated[str, Path(description="SHA-256 of the shot (64 lowercase hex digits), from GET .../shots.")]


@router.put("/{category}/threshold", dependencies=AUDITED,
            response_model=ThresholdChanged, summary="Set the decision policy",
            responses=errors(400, 401, 403, 404, 409, 422,
                             e400="Invalid name, or not exactly one of the three fields.",
                             e409="No usable active version, it stores no calibration evidence, or another writer "
                                  "changed the active version meanwhile (`version_conflict`: retry).",
                             e422="A value out of range (rate not in (0, 0.5), negative threshold)."))
async def set_threshold(category: CategoryPath, _: AdminDep, service: CategoriesDep, records: RecordsDep,
                        body: Annotated[ThresholdRequest, Body()],
                        dry_run: Annotated[bool, Query(description=_DRY_RUN_DOC)] = False) -> ThresholdChanged:
    """New version = the active one under a new decision policy; answers with the expected rates. Admin only.

    The threshold is recomputed from the calibration evidence stored in the active version (no images are
    processed), so this is instant; roll back by activating the previous version. A rule that stops inspecting
    (expected recall 0, or half the good parts flagged) is still applied, with `warnings` saying so."""
    policy = policy_from_request(body.target_false_alarm_rate, body.threshold, body.policy)
    answer = ThresholdChanged(**await service.set_threshold(category, policy, dry_run=dry_run))
    if dry_run:
        answer.recorded = await run_in_threadpool(_effect, service, records, answer)
    return answer


def _effect(service: CategoryService, records: RecordService, preview: ThresholdChanged) -> RecordedEffect:
    """The preview's rule against the rule serving now, on the newest recorded scores of the same model."""
    evidence = service.scores(preview.category)
    versions = evidence["model_versions"]
    scores = records.inspections.recent_scores(preview.category, versions, RECORDED_DEFAULT)
    return RecordedEffect(**recorded_effect(scores, evidence["decision"]["threshold"], preview.decision.threshold,
                                            versions))


@router.get("/{category}/scores", response_model=ScoreDistributions, summary="The scores a decision rests on",
            responses=errors(400, 401, 404, 409, 422, e404="Unknown category.",
                             e409="No usable active version, or it stores no calibration evidence."))
def score_distributions(
    category: CategoryPath, _: ClientDep, service: CategoriesDep, records: RecordsDep,
    recorded: Annotated[int, Query(ge=0, le=RECORDED_MAX, description=f"How many of the newest recorded "
                                   f"inspections to include: default {RECORDED_DEFAULT}, at most {RECORDED_MAX}, "
                                   "0 for none.")] = RECORDED_DEFAULT,
) -> ScoreDistributions:
    """The active version's calibration evidence by kind, its decision, and the scores of the newest recorded
    inspections its model made: what the console draws the threshold over. Client or admin key."""
    evidence = service.scores(category)
    versions = evidence.pop("model_versions")
    scores = records.inspections.recent_scores(evidence["category"], versions, recorded)
    return ScoreDistributions(**evidence, recorded=scores, recorded_versions=versions)


@router.post("/{category}/feedback", dependencies=AUDITED, status_code=201, response_model=FeedbackResult,
             summary="Teach a product with confirmed images",
             responses={**errors(400, 401, 403, 404, 409, 413, 415, 422, 503,
                              e400="Invalid name, label, defect type or note; corrupt or empty image; too many.",
                              e409="No usable active version or memory branch, an image already carries the "
                                   "other label, or the active version changed meanwhile (`version_conflict`)."),
                        **ACCEPTED})
async def feedback(
    category: CategoryPath,
    _: AdminDep,
    service: CategoriesDep,
    settings: SettingsDep,
    budget: PixelBudgetDep,
    refits: RefitsDep,
    label: Annotated[str, Form(description="`good` (a false alarm) or `defect` (a confirmed or missed defect).")],
    files: Annotated[list[UploadFile] | None, File(description="1-16 images carrying that label.")] = None,
    defect_type: Annotated[str | None, Form(description="With `defect`: a slug such as `scratch`.")] = None,
    note: Annotated[str | None, Form(description="Up to 500 printable characters.")] = None,
    wait: WaitQuery = True,
) -> FeedbackResult | JSONResponse:
    """Confirmed goods join the normal memory, confirmed defects the validation set. Admin only.

    Makes a new version (memory and calibration re-fitted, through the LoRA of a fine-tuned version) that
    reports its recall on the confirmed defects; nothing is written unless every field and image checks out.
    ``wait=false``: 202 with a `feedback` job."""
    uploads = files or []
    data = [(f.filename or "", await f.read(settings.max_upload_bytes + 1)) for f in uploads]
    pixels = await run_in_threadpool(upload_pixels, data, max_pixels=settings.max_image_pixels,
                                     max_bytes=settings.max_upload_bytes)
    kind, note = defect_type or None, note or None
    if not wait:
        async def refit(progress: RefitProgress) -> dict[str, Any]:
            result = await service.feedback(category, data, label=label, defect_type=kind, note=note,
                                            progress=progress)
            return FeedbackResult(**result).model_dump(mode="json")

        params = {"images": len(data), "label": label, **({"defect_type": kind} if kind else {})}
        return await start_refit(refits, budget, pixels, kind="feedback", params=params, refit=refit,
                                 check=lambda: service.check_feedback(category, data, label=label,
                                                                      defect_type=kind, note=note))
    async with fit_admitted(budget, pixels):  # 413 / 503 from the headers, before a pixel is decoded
        result = await service.feedback(category, data, label=label, defect_type=kind, note=note)
    return FeedbackResult(**result)


@router.get("/{category}/shots", response_model=ShotList, summary="A product's good shots",
            responses=errors(400, 401, 404, 422))
def list_shots(category: CategoryPath, _: ClientDep, service: CategoriesDep) -> ShotList:
    """The good images the active version was fitted on (registration shots and confirmed goods)."""
    return ShotList(**service.list_shots(category))


@router.delete("/{category}/shots/{sha256}", dependencies=AUDITED,
               response_model=ShotRemoved, summary="Remove one shot",
               responses={**errors(400, 401, 403, 404, 409, 422, e404="Unknown category or shot.",
                                   e409="It is the last shot, no version is usable, or the active version changed "
                                        "meanwhile (`version_conflict`: retry)."), **ACCEPTED})
async def remove_shot(category: CategoryPath, sha256: Sha256Path, _: AdminDep, service: CategoriesDep,
                      budget: PixelBudgetDep, refits: RefitsDep, wait: WaitQuery = True) -> ShotRemoved | JSONResponse:
    """New version fitted without the shot; the old versions keep it, so activate rolls back. Admin only.

    ``wait=false``: 202 with a `remove_shot` job."""
    if not wait:
        async def refit(progress: RefitProgress) -> dict[str, Any]:
            result = await service.remove_shot(category, sha256, progress=progress)
            return ShotRemoved(**result).model_dump(mode="json")

        return await start_refit(refits, budget, 0, kind="remove_shot", params={"sha256": sha256}, refit=refit,
                                 check=lambda: service.check_remove_shot(category, sha256))
    async with fit_admitted(budget, 0):  # nothing uploaded; the re-fit's memory is given back after
        return ShotRemoved(**await service.remove_shot(category, sha256))
