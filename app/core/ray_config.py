"""Settings of the Ray Serve layout (``clipshot serve-ray``); part of the one ``Settings`` object.

Kept in their own file because only one layout reads them; ``Settings`` inherits them, so they come from
``CLIPSHOT_RAY_*`` variables like every other setting and appear in the same generated reference.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator


class RaySettings(BaseModel):
    """How ``clipshot serve-ray`` lays clipshot out on a Ray cluster (ignored by ``clipshot serve``)."""

    ray_address: str = Field(
        "",
        description="Ray cluster to join: empty = start a private Ray instance on this machine; `auto` = the "
        "cluster this machine is a node of (`ray start` ran here, or a KubeRay head pod); `ray://host:10001` = "
        "Ray Client.",
    )
    ray_min_replicas: int = Field(
        1, ge=1, le=1024, description="Fewest detector replicas (each holds one backbone and its adapter LRU)."
    )
    ray_max_replicas: int = Field(
        1, ge=1, le=1024,
        description="Most detector replicas; above `ray_min_replicas`, Ray Serve autoscales between the two on "
        "requests in flight per replica (`ray_target_ongoing_requests`).",
    )
    ray_target_ongoing_requests: float = Field(
        8.0, gt=0, le=4096,
        description="Autoscaling target: requests in flight per detector replica that Ray Serve aims at. Near "
        "`max_batch_size` keeps batches full without queueing much longer than one forward.",
    )
    ray_max_ongoing_requests: int = Field(
        64, ge=1, le=65_536,
        description="Requests one detector replica accepts at once; the router queues the rest (and answers "
        "503 when every replica is full and its queue too). At least `max_batch_size`, or batches never fill.",
    )
    ray_num_gpus: float | None = Field(
        None, ge=0, le=64,
        description="GPUs reserved per detector replica (fractions share a GPU). Empty: 1 when the cluster "
        "has GPUs and `device` is not `cpu`, else 0.",
    )
    ray_num_cpus: float = Field(1.0, ge=0, le=1024, description="CPUs reserved per detector replica.")
    ray_router_replicas: int = Field(
        1, ge=1, le=64,
        description="Replicas of the CPU router (ingress) that resolves `category@version` and forwards; 2+ so "
        "losing a node does not stop routing.",
    )
    ray_router_body_bytes: int = Field(
        1024 * 1024 * 1024, ge=1, le=1 << 40,
        description="Bytes of request bodies one router replica holds at once (each is kept until its replica "
        "answers); a request that would pass it gets 503 `router_full` with Retry-After before the rest of its "
        "body is read. At least `max_request_bytes`.",
    )
    ray_finetune_workers: int = Field(
        0, ge=0, le=256,
        description="Dedicated fine-tune replicas (same resources as a detector replica) that claim queued "
        "jobs from the PostgreSQL `job_db`; when > 0 the detector replicas never train. 0: detector replicas "
        "run fine-tunes behind their predictions, as `clipshot serve` does.",
    )

    @model_validator(mode="after")
    def _check_ray_bounds(self) -> RaySettings:
        if self.ray_min_replicas > self.ray_max_replicas:
            raise ValueError(f"ray_min_replicas ({self.ray_min_replicas}) must be <= ray_max_replicas "
                             f"({self.ray_max_replicas})")
        return self


__all__ = ["RaySettings"]
