"""The service's single source of configuration: one pydantic-settings ``Settings`` object.

Every knob is read from ``CLIPSHOT_<FIELD>`` environment variables (or a ``.env`` file) and
validated at startup, so a typo fails loudly before the model is loaded rather than at the first
request. There is deliberately no module-level singleton: the app factory builds one ``Settings``
and stores it on ``app.state.settings`` so tests can run several apps side by side.
``docs/reference/settings.md`` is generated from these fields (``python -m app.core.settings_doc``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.core.key_names import derived_name, parse_key_list, split_named_keys
from app.core.mqtt_config import MqttSettings
from app.core.opcua_config import OpcUaSettings
from app.core.ray_config import RaySettings
from app.core.record_config import RecordSettings
from app.core.server_config import ServerSettings
from app.core.upload_limits import UploadLimits

log = logging.getLogger(__name__)

ENV_PREFIX = "CLIPSHOT_"
MiB = 1024 * 1024
GiB = 1024 * MiB
# Registration's default pixel bound per shot of ``max_shots``: a 12 MP line camera's frame.
REGISTER_PIXELS_PER_SHOT = 12_000_000
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

Precision = Literal["auto", "fp32", "fp16", "bf16"]
# NoDecode: take the raw env string so "k1,k2" works; the validator below also accepts a JSON list.
KeyList = Annotated[list[str], NoDecode]


class InsecureConfigurationError(RuntimeError):
    """Raised by ``Settings.validate_security`` when the service would start with no authentication."""


class Settings(BaseSettings, UploadLimits, ServerSettings, MqttSettings, OpcUaSettings, RaySettings,
               RecordSettings):
    """Runtime configuration of the clipshot service (env prefix ``CLIPSHOT_``)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        validate_assignment=True,
    )

    # --- model -------------------------------------------------------------------------------
    backbone: str = Field(
        "open_clip:ViT-B-16-plus-240:laion400m_e32",
        min_length=1,
        description="Frozen backbone spec: `open_clip:<arch>:<pretrained tag or path>`, "
        "`imagenet:efficientnet-lite0|1|2`, `timm:<vit arch>:<path to a local DINOv2/DINOv3 file>` (memory branch "
        "only) or `test:tiny-clip`. Adapters are only valid for the backbone "
        "they were built with.",
    )
    device: str = Field(
        "auto",
        description="Torch device: `auto` (first CUDA GPU if available, else CPU), `cpu`, `cuda` "
        "or `cuda:N`.",
    )
    precision: Precision = Field(
        "auto",
        description="Backbone compute precision: `auto` (bf16 on GPUs that support it, fp16 on older GPUs, fp32 "
        "on CPU), `fp32`, `fp16` or `bf16`. Half precision only pays off on GPU.",
    )
    memory_precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="What the memory branch's nearest-neighbour cosines (most of a CPU predict's time) are computed "
        "in for products fitted here: `auto` (bf16 on CPUs that multiply it natively, AVX512-BF16 or AMX, fp32 on "
        "other CPUs; fp16 on a GPU running half precision, fp32 on a GPU told fp32), `fp32` (exact), `bf16` or "
        "`fp16` (GPU only). A product records the precision its calibration was scored in and is scored so "
        "wherever the machine computes it natively. bf16 halves the search on CPU; distances move by under 1e-3.",
    )
    image_size: int | None = Field(
        None,
        ge=32,
        le=2048,
        description="Backbone input resolution in pixels; empty/`none` uses the backbone's native size.",
    )

    # --- storage and adapter cache --------------------------------------------------------------
    store: Path = Field(
        Path("store"),
        description="Directory holding adapters, reference shots and the job database (`jobs.sqlite3`). "
        "Relative paths resolve against the working directory.",
    )
    keep_versions: int = Field(
        20, ge=0, le=100_000,
        description="Versions kept per product: after each new version the oldest beyond this many are deleted, "
        "never the active one, one pinned with `PUT .../versions/{v}/pin`, or the one a running fine-tune trained "
        "from; shot files no kept version lists go with them. 0 keeps every version.",
    )
    adapter_cache_device: int = Field(
        8, ge=0, description="Adapters kept resident on the accelerator (hot tier); 0 disables the tier."
    )
    adapter_cache_cpu: int = Field(
        64, ge=0, description="Adapters kept in host memory (warm tier) after eviction from the device tier."
    )
    adapter_cache_device_bytes: int = Field(
        2 * GiB, ge=0,
        description="Bytes of adapters (memory banks, text embeddings, LoRA tensors) kept resident on the "
        "accelerator; the least recently used are evicted past it or past `adapter_cache_device`, whichever "
        "binds first. The adapters of the batch being served always stay, so one product larger than this still "
        "runs. 0 = no byte bound.",
    )
    adapter_cache_cpu_bytes: int = Field(
        8 * GiB, ge=0,
        description="Bytes of adapters kept in host memory (warm tier), bounded like `adapter_cache_device_bytes`; "
        "an adapter larger than this alone is served but not kept (the next request loads it again). "
        "0 = no byte bound.",
    )
    lora_merge: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Fold the serving product's LoRA into the backbone weights (`on`) instead of running LoRA "
        "branches in every forward (`off`): the forward then costs what the frozen backbone costs, but switching "
        "products copies the weights back. `auto` = `on` on GPUs (launch-bound at small batches), `off` on CPU.",
    )
    mixed_lora: Literal["gather", "group", "split"] = Field(
        "gather",
        description="How one batch serves several LoRA products: `gather` (per-sample low-rank deltas with batched "
        "matmuls over one base forward; fastest on CPU in benchmarks/mixed_batches.py), `group` (the deltas per "
        "product, gathered and scattered back) or `split` (one backbone forward per LoRA product). Products "
        "without LoRA always share one forward; a batch of one product folds/branches as `lora_merge` says.",
    )
    runtime: Literal["torch", "onnxruntime", "openvino"] = Field(
        "torch",
        description="What runs the backbone's feature forward on CPU: `torch`, `onnxruntime` or `openvino` (extra "
        "`runtimes`). The runtime graph is exported per backbone, geometry frame and folded LoRA on first use (or "
        "ahead of time by `clipshot export`) and checked against PyTorch before use; memory scoring, maps and "
        "calibration stay PyTorch, and features agree within 1e-4. Needs `device` cpu and `precision` fp32/auto.",
    )
    runtime_quantize: Literal["none", "int8"] = Field(
        "none",
        description="`int8`: serve static int8 graphs (ONNX Runtime's QDQ quantisation) instead of fp32 ones, each "
        "calibrated on exactly its product's shots at its geometry when the product is fitted (registration, "
        "feedback, fine-tune); its memory bank, threshold and predictions all come from that graph. A graph missing "
        "from the cache is re-made from the stored shots. Needs `runtime` onnxruntime or openvino; bundles fitted "
        "without int8 keep their fp32 graph (with a warning) until refitted. Not recommended: it fails the accuracy "
        "gate (F1 at threshold -2.7 points on one shared dataset at 16 shots, docs/results/int8); check your product "
        "first.",
    )
    runtime_cache: Path | None = Field(
        None,
        description="Folder of exported runtime graphs, one sub-folder per backbone + frame + LoRA digest; "
        "empty = `<store>/runtime-cache`.",
    )

    # --- batching ------------------------------------------------------------------------------
    max_batch_size: int = Field(
        32,
        ge=1,
        le=1024,
        description="Most images the batcher sends through the backbone in one forward pass.",
    )
    max_batch_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="While a batch is on the device, how long the batcher collects more requests before sending "
        "a partial batch (ms). An idle device takes a lone request at once.",
    )
    predict_timeout_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="Most seconds an image waits for its batch (queue + device) before its predict request fails "
        "with 503 `predict_timeout` and Retry-After, so a stuck or saturated device never leaves a request hanging.",
    )
    max_pending_images: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Most images admitted for prediction at once (decoding, queued or on the device). A predict "
        "request that would exceed it is refused at once with 503 + Retry-After instead of queueing behind "
        "work it cannot overtake, so an overloaded line fails fast. Must be at least `max_predict_images`.",
    )

    # --- few-shot limits -----------------------------------------------------------------------
    min_shots: int = Field(
        1, ge=1, description="Fewest good reference photos accepted when registering a product."
    )
    max_shots: int = Field(
        16, ge=1, description="Most good reference photos accepted in one upload (registration, more shots or "
        "feedback); also the memory budget: beyond this many good images the memory is thinned with a coreset."
    )
    max_category_images: int = Field(
        128, ge=1, description="Most good images (shots + confirmed goods) and, separately, most confirmed "
        "defects one product may hold; every re-fit extracts features of all of them."
    )
    recommended_min_shots: int = Field(
        4, ge=1, description="Below this many shots registration succeeds but the response carries a warning."
    )
    max_predict_images: int = Field(32, ge=1, description="Most images accepted in one predict request.")

    # --- auth ----------------------------------------------------------------------------------
    admin_keys: KeyList = Field(
        default_factory=list,
        repr=False,
        description="Bearer keys allowed to manage products and jobs (and to predict). "
        'Comma-separated (`k1,k2`), a JSON list (`["k1","k2"]`) or a JSON object naming them for the audit log '
        '(`{"alice":"k1","line-3":"k2"}`); an unnamed key is called `admin-<first 8 hex of its SHA-256>`.',
    )
    client_keys: KeyList = Field(
        default_factory=list,
        repr=False,
        description="Bearer keys allowed to predict only (production lines). Same format as `admin_keys`.",
    )
    metrics_require_key: bool = Field(
        False,
        description="Require an admin or client key on `/metrics` (configure it in the Prometheus "
        "scrape job).",
    )
    insecure_dev: bool = Field(
        False,
        description="Allow starting with no keys at all, which disables authentication. Development only: "
        "without it the service refuses to start when both key lists are empty.",
    )

    # --- fine-tuning ---------------------------------------------------------------------------
    finetune_steps: int = Field(
        300, ge=1, le=100_000,
        description="Default optimisation steps of a fine-tune job (the same default as `clipshot train fewshot`).",
    )
    finetune_seconds: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="Default wall-clock budget of a fine-tune job (s); it stops early when spent.",
    )

    # --- job database and fine-tune workers ------------------------------------------------------
    job_db: str | None = Field(
        None,
        repr=False,
        description="Where fine-tune job records live. Empty: `jobs.sqlite3` in the store (one process). "
        "`postgresql://user:password@host:port/database`: a PostgreSQL database shared by every replica and "
        "fine-tune worker, so a queued job is claimed by exactly one of them. Unreachable at start-up -> the "
        "service does not start.",
    )
    job_worker: bool = Field(
        True,
        description="Claim and run queued fine-tunes in this process. Set `false` on serving-only replicas when "
        "dedicated workers (same `job_db` and store) run them; needs a PostgreSQL `job_db`.",
    )
    job_stale_s: float = Field(
        60.0,
        ge=0.5,
        le=86_400,
        description="A running fine-tune whose worker sent no heartbeat for this long (s) is marked failed by any "
        "other worker, as a restart fails a local one (workers beat every quarter of it). Keep it well above "
        "clock skew between machines.",
    )

    _insecure_warned: bool = PrivateAttr(False)  # the no-auth warning is said once per Settings, not per check
    _key_names: dict[str, str] = PrivateAttr(default_factory=dict)  # key fingerprint -> name (audit log)

    @field_validator("device", mode="before")
    @classmethod
    def _check_device(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip().lower()
            if not _DEVICE_RE.match(v):
                raise ValueError(
                    f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index), got {v!r}"
                )
        return v

    @field_validator("precision", "memory_precision", mode="before")
    @classmethod
    def _normalise_precision(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("image_size", mode="before")
    @classmethod
    def _empty_image_size(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in ("", "none", "null", "native"):
            return None
        return v

    @field_validator("store", mode="after")
    @classmethod
    def _expand_store(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("runtime_cache", mode="before")
    @classmethod
    def _empty_runtime_cache(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("job_db", mode="before")
    @classmethod
    def _check_job_db(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        if not isinstance(v, str) or not re.match(r"^postgres(ql)?://", v.strip()):
            raise ValueError("job_db must be empty (SQLite in the store) or a "
                             "postgresql://user:password@host:port/database URL")
        return v.strip()

    @model_validator(mode="wrap")
    @classmethod
    def _named_keys(cls, data: Any, handler: Any) -> Settings:
        """Take names out of the object form of the key lists (the fields themselves stay lists of keys)."""
        names: dict[str, str] = {}
        if isinstance(data, dict):
            data = dict(data)
            for field in ("admin_keys", "client_keys"):
                if field in data:
                    data[field], found = split_named_keys(data[field])
                    names.update(found)
        settings = handler(data)
        if isinstance(data, dict):  # a fresh build; re-validation on assignment keeps the names it had
            settings._key_names = names
        return settings

    def key_name(self, scope: str, fingerprint: str) -> str:
        """The configured name of the key with this SHA-256 hex digest, or one derived from it."""
        return self._key_names.get(fingerprint) or derived_name(scope, fingerprint)

    @field_validator("admin_keys", "client_keys", mode="before")
    @classmethod
    def _parse_keys(cls, v: Any) -> Any:
        """The plain key-list forms (``key_names.parse_key_list``); ``_named_keys`` already unpacked the object."""
        return parse_key_list(v)

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.max_shots > self.max_category_images:
            raise ValueError(f"max_shots ({self.max_shots}) must be <= max_category_images "
                             f"({self.max_category_images})")
        if self.min_shots > self.max_shots:
            raise ValueError(f"min_shots ({self.min_shots}) must be <= max_shots ({self.max_shots})")
        if not self.min_shots <= self.recommended_min_shots <= self.max_shots:
            raise ValueError(
                f"recommended_min_shots ({self.recommended_min_shots}) must lie between "
                f"min_shots ({self.min_shots}) and max_shots ({self.max_shots})"
            )
        if self.max_pending_images < self.max_predict_images:
            raise ValueError(
                f"max_pending_images ({self.max_pending_images}) must be >= "
                f"max_predict_images ({self.max_predict_images}): a full request could never be admitted"
            )
        if self.runtime_quantize != "none" and self.runtime == "torch":
            raise ValueError(f"runtime_quantize={self.runtime_quantize} needs runtime onnxruntime or openvino: "
                             "PyTorch serves fp32 features only")
        if not self.job_worker and not self.job_db:
            raise ValueError("job_worker=false needs a shared PostgreSQL job_db: with the SQLite job file no other "
                             "process could run this one's fine-tunes")
        if not self.max_image_pixels <= self.max_request_pixels <= self.max_inflight_pixels:
            raise ValueError(
                f"pixel limits must grow: max_image_pixels ({self.max_image_pixels}) <= max_request_pixels "
                f"({self.max_request_pixels}) <= max_inflight_pixels ({self.max_inflight_pixels})"
            )
        if self.max_register_pixels is None:
            self.max_register_pixels = min(self.max_shots * REGISTER_PIXELS_PER_SHOT, self.max_inflight_pixels)
        if not self.max_image_pixels <= self.max_register_pixels <= self.max_inflight_pixels:
            raise ValueError(
                f"max_register_pixels ({self.max_register_pixels}) must lie between max_image_pixels "
                f"({self.max_image_pixels}) and max_inflight_pixels ({self.max_inflight_pixels})"
            )
        if self.max_request_bytes < self.max_upload_bytes:
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) must be >= "
                f"max_upload_bytes ({self.max_upload_bytes})"
            )
        if self.ray_router_body_bytes < self.max_request_bytes:
            raise ValueError(
                f"ray_router_body_bytes ({self.ray_router_body_bytes}) must be >= max_request_bytes "
                f"({self.max_request_bytes}): a largest request could never be forwarded"
            )
        return self

    @property
    def runtime_cache_dir(self) -> Path:
        """Where exported runtime graphs live: ``runtime_cache``, else beside the bundles in the store."""
        return (self.runtime_cache or self.store / "runtime-cache").expanduser()

    @property
    def auth_enabled(self) -> bool:
        """False only in the explicit insecure-dev mode, where every request is allowed."""
        return bool(self.admin_keys or self.client_keys)

    def validate_security(self) -> None:
        """Refuse to run unauthenticated by accident: call at startup, before serving traffic."""
        if self.auth_enabled:
            return
        if not self.insecure_dev:
            raise InsecureConfigurationError(
                f"No API keys configured: set {ENV_PREFIX}ADMIN_KEYS and/or {ENV_PREFIX}CLIENT_KEYS "
                f"(comma-separated), or set {ENV_PREFIX}INSECURE_DEV=true to run WITHOUT authentication "
                "(development only)."
            )
        if not self._insecure_warned:
            self._insecure_warned = True
            log.warning(
                "clipshot is running WITHOUT authentication (%sINSECURE_DEV=true, no keys set)", ENV_PREFIX
            )


def env_var(field_name: str) -> str:
    """Environment variable that sets ``field_name``; used by docs and error messages."""
    return f"{ENV_PREFIX}{field_name.upper()}"
