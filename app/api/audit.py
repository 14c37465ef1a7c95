"""One dependency that turns every successful admin change into an audit event (``app.records.audit``).

Why a dependency around the handler instead of a call in each one: the change routes stay as they were, and a new
change route is audited by adding ``AUDITED`` to its decorator. The dependency reads the product's active version
before the handler runs and after it returns (``scope="function"``: before the response is sent), and writes the
event only when the handler succeeded; a refused or failed change is no change. A preview (``dry_run=true``) is
not a change either. Concurrent changes of one product may interleave between the two reads; the service's
per-product lock and ``version_conflict`` checks keep that window to requests racing on the same product.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from app.api.deps import AdminDep
from app.api.request_id import current_request_id

log = logging.getLogger(__name__)
# Route (handler) name -> audit action; a route missing here is logged under its own name.
ACTIONS = {
    "start_finetune": "finetune_start", "delete_category": "delete", "activate_version": "activate",
    "pin_version": "pin", "unpin_version": "unpin", "set_threshold": "threshold", "feedback": "feedback",
    "remove_shot": "shot_remove", "cancel_job": "finetune_cancel", "delete_inspections": "inspections_delete",
}
_DETAIL_QUERY = ("before", "wait")  # query parameters worth keeping with the event (wait=false: a refit job)


def _active_version(store: Any, category: str | None) -> int | None:
    if category is None:
        return None
    with contextlib.suppress(Exception):  # an invalid or unknown name: the handler answers for it
        return store.active_version(category)
    return None


def _action(name: str, before: int | None, after: int | None) -> str:
    if name == "register_shots":
        return "register" if before is None else "shots_add"
    if name == "activate_version" and before is not None and after is not None and after < before:
        return "rollback"
    return ACTIONS.get(name, name)


async def audit_change(request: Request, principal: AdminDep) -> AsyncIterator[None]:
    """Around an admin route: record who changed what, from which version to which, if it succeeded."""
    state = request.app.state
    category = request.path_params.get("category")
    before = await run_in_threadpool(_active_version, state.store, category)
    yield
    if request.query_params.get("dry_run", "").lower() in ("1", "true", "yes", "on"):
        return
    after = await run_in_threadpool(_active_version, state.store, category)
    route = request.scope.get("route")
    detail = {k: v for k, v in request.path_params.items() if k != "category"}
    detail |= {k: request.query_params[k] for k in _DETAIL_QUERY if k in request.query_params}
    try:
        await run_in_threadpool(
            state.records.audit.append, key_name=principal.name, scope=principal.scope,
            action=_action(getattr(route, "name", "unknown"), before, after), category=category,
            before_version=before, after_version=after, detail=detail or None, request_id=current_request_id())
    except Exception:  # the change is made; losing its event is an operator's problem, not the client's
        log.exception("could not write the audit event of %s %s", request.method, request.url.path)


AUDITED = [Depends(audit_change, scope="function")]
