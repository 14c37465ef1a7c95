"""Visual-memory branch: distance of every patch to its nearest normal patch (PatchCore / WinCLIP+)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clipshot.chunked import Steps, finish
from clipshot.features import Features

SIM_BUDGET = 8_000_000  # similarity entries per matmul chunk: keeps the block cache-friendly and bounded
COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Distance entries (bank rows x projected dims x picks) per coreset chunk: a few tenths of a second of work on
# one CPU core, milliseconds on a GPU, so a large bank never holds the device worker for long.
CORESET_CHUNK = 2**24


MEMORY_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 natively: CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX.

    Elsewhere PyTorch still computes bf16 matmuls, but by converting to fp32 on the way, slower than fp32 itself."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def memory_precision(device: torch.device | str, precision: str, requested: str = "auto") -> str:
    """``fp32``, ``bf16`` or ``fp16``: what memory cosines are computed in for a backbone on ``device`` at
    ``precision``, unless ``requested`` names one.

    ``auto``: fp16 on an accelerator running a half precision, bf16 included (fp16's 10-bit mantissa keeps the
    cosine error near 1e-3 where bf16's 7 bits would not, and accelerators multiply both at the same speed); fp32
    on an accelerator told fp32 (a service told fp32 must not score in half). On CPU, bf16 where the CPU
    multiplies it natively and fp32 elsewhere: the nearest-neighbour matmul is most of a CPU predict's time, it
    runs at the core's fp32 peak already, and native bf16 halves it. Inputs rounded to 8 significant bits move a
    cosine by at most ~1e-2 in theory and a distance by under 7.5e-4 on the shared sets' features (``_shifted``); the
    calibration is scored in the same precision (the adapter records it), and the accuracy suite gates the rule
    (docs/results/memory-bf16/). fp16 is refused on CPU: PyTorch has no fast half matmul there (~10x fp32)."""
    if requested not in MEMORY_PRECISIONS:
        raise ValueError(f"memory precision must be one of {', '.join(MEMORY_PRECISIONS)}, got {requested!r}")
    cpu = torch.device(device).type == "cpu"
    if requested == "fp16" and cpu:
        raise ValueError("memory precision fp16 needs an accelerator (half matmuls are ~10x slower than fp32 on "
                         "CPU): use bf16 or fp32")
    if requested != "auto":
        return requested
    if cpu:
        return "bf16" if native_bf16("cpu") else "fp32"
    return "fp32" if precision == "fp32" else "fp16"


def greedy_coreset(bank: torch.Tensor, ratio: float, *, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of a k-center greedy coreset (PatchCore): keeps coverage of the normal manifold while
    shrinking the bank, which bounds nearest-neighbour cost for large shot counts."""
    return finish(greedy_coreset_steps(bank, ratio, projection_dim=projection_dim, seed=seed))


def greedy_coreset_steps(bank: torch.Tensor, ratio: float, *, projection_dim: int = 128,
                         seed: int = 0) -> Steps[torch.Tensor]:
    """``greedy_coreset`` as chunks of at most ``CORESET_CHUNK`` distance entries each (see ``clipshot.chunked``).

    The loop never reads a value back to the host: the chosen index stays a device tensor that indexes the
    next row, so a GPU queues the whole chunk without waiting after every pick."""
    count = bank.shape[0]
    keep = max(1, int(round(count * ratio)))
    if keep >= count:
        return torch.arange(count, device=bank.device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    dim = bank.shape[1]
    if dim > projection_dim:
        proj = torch.randn(dim, projection_dim, generator=generator).to(bank.device, torch.float32)
        points = bank.float() @ proj
    else:
        points = bank.float()
    selected = torch.empty(keep, dtype=torch.long, device=bank.device)
    selected[:1] = torch.randint(count, (1,), generator=generator)
    distance = torch.cdist(points, points.index_select(0, selected[:1])).squeeze(1)
    per_chunk = max(1, CORESET_CHUNK // (count * points.shape[1]))
    for i in range(1, keep):
        nxt = torch.argmax(distance).view(1)
        selected[i : i + 1] = nxt
        distance = torch.minimum(distance, torch.cdist(points, points.index_select(0, nxt)).squeeze(1))
        if i % per_chunk == 0:
            yield
    return selected


class MemoryBank:
    """Normal patch embeddings per layer, stored fp16 (half the bytes, cosine error ~1e-3), and only so: the form
    cosines are taken in (centred, per stage, fp32 on CPU) is derived per call, never stored beside it.

    With ``centers`` (one (D,) mean of the normal patches per layer) distances are cosines *around the normal
    mean* instead of around the backbone's origin (mean-shifted features, Reiss & Hoshen, AAAI 2023). Pretrained
    features share a large common component; measured from the origin it compresses every angle, so a product
    whose normal look differs from the shots (another spindle position, light) and a real defect end up at
    similar distances. Centring at the shots' own mean takes that component out. It needs no constant: the centre
    is the mean of the patches the bank is built from.

    With ``stages`` (the channel widths of the backbone stages concatenated in each patch vector, e.g. 40 + 112
    for EfficientNet-Lite0's stride-8 and stride-16 outputs) every stage is scored as a layer of its own: its
    slice re-normalised, centred on its own mean, its own nearest neighbour, and the stage distances averaged,
    as the CLIP layers already are. Concatenated and normalised together, the stage with the larger activations
    outweighs the other (issue 10: ball screw image AUROC 91.7 -> 92.3, bottle pixel AUROC 98.4 -> 98.7).

    With ``pools`` (per stage, how many grid cells its own feature grid spans: 1, 2 for EfficientNet-Lite0) a stage
    computed at a coarser stride is searched at that stride: at every p-th cell of every p-th row, exactly as
    before (the whole bank, every row kept), and linearly interpolated between them. The backbone upsampled that
    stage onto the grid, so neighbouring cells carry interpolations of the same few vectors; searching all of them
    costs p^2 times the work for no detail the stage has. Sampling cells rather than averaging blocks keeps each
    query a vector of the kind the bank holds (block means are smoother than any bank row, which moved the
    paper texture's threshold: docs/results/stage-grids/)."""

    def __init__(self, layers: list[torch.Tensor], centers: list[torch.Tensor] | None = None,
                 stages: Sequence[int] | None = None, pools: Sequence[int] | None = None):
        if not layers or any(layer.ndim != 2 for layer in layers):
            raise ValueError("a memory bank needs one (M, D) tensor per layer")
        if centers is not None and (len(centers) != len(layers) or any(
                c.shape != (layer.shape[1],) for c, layer in zip(centers, layers, strict=True))):
            raise ValueError("a centred memory bank needs one (D,) centre per layer, matching its layers")
        if stages is not None and (not stages or any(int(w) < 1 for w in stages)
                                   or any(sum(stages) != layer.shape[1] for layer in layers)):
            raise ValueError(f"memory stages {stages} must be positive widths summing to the feature dim")
        if pools is not None and (stages is None or len(pools) != len(stages) or any(int(p) < 1 for p in pools)):
            raise ValueError(f"memory stage pools {pools} need one factor >= 1 per stage (stages {stages})")
        self.layers = [layer.to(torch.float16).contiguous() for layer in layers]
        self.centers = None if centers is None else [c.float().contiguous() for c in centers]
        self.stages = None if stages is None else [int(w) for w in stages]
        self.pools = None if pools is None or all(int(p) == 1 for p in pools) else [int(p) for p in pools]
        # Rows a coreset kept, per layer, as indices into the flattened (images x patches) rows it was built from:
        # calibration's leave-one-out banks are this same coreset without the held-out image. Set by
        # ``from_features`` when a coreset ran; not part of the bundle.
        self.kept: list[torch.Tensor] | None = None

    @classmethod
    def from_features(cls, features: Features, coreset_ratio: float | None = None, *,
                      center: bool = False, stages: Sequence[int] | None = None,
                      pools: Sequence[int] | None = None) -> MemoryBank:
        """Bank of every patch of ``features``; ``center`` stores their per-layer mean (taken before the coreset,
        so the centre is the mean of all the normal patches, not of the kept subset; per stage with ``stages``)."""
        return finish(cls.from_features_steps(features, coreset_ratio, center=center, stages=stages, pools=pools))

    @classmethod
    def from_features_steps(cls, features: Features, coreset_ratio: float | None = None, *,
                            center: bool = False, stages: Sequence[int] | None = None,
                            pools: Sequence[int] | None = None,
                            keep: Sequence[torch.Tensor] | None = None) -> Steps[MemoryBank]:
        """``from_features`` with the coreset's loop in bounded chunks (see ``clipshot.chunked``).

        The coreset is chosen in the space the bank scores in (each stage re-normalised, centred when ``center``),
        so the patches it keeps cover what the distances measure, not the raw vectors. ``keep``: per-layer row
        indices to keep instead of running a coreset (a leave-one-out bank taken from a served coreset)."""
        layers = [p.reshape(-1, p.shape[-1]).detach() for p in features.patches]
        centers = None
        if center:
            centers = [torch.cat([part.mean(dim=0) for part in _split(layer.float(), stages)]) for layer in layers]
        kept = None
        if keep is not None:
            kept = [k.to(layers[0].device) for k in keep]
        elif coreset_ratio is not None and coreset_ratio < 1:
            kept = []
            for i, layer in enumerate(layers):
                points = layer if centers is None and stages is None else torch.cat(
                    _scored_parts(layer, None if centers is None else centers[i], stages), dim=-1)
                kept.append((yield from greedy_coreset_steps(points, coreset_ratio)))
        if kept is not None:
            layers = [layer[k] for layer, k in zip(layers, kept, strict=True)]
        bank = cls(layers, centers, stages, pools)
        bank.kept = kept
        return bank

    @property
    def centered(self) -> bool:
        return self.centers is not None

    def _shift(self, x: torch.Tensor, layer: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """``x`` as the vectors cosines are taken between: one per stage (one in all without ``stages``), each
        re-normalised around its centre (unchanged for an uncentred single-stage bank)."""
        if self.centers is None and self.stages is None:
            return [x.to(dtype)]
        center = None if self.centers is None else self.centers[layer].to(x.device)
        return [part.to(dtype) for part in _scored_parts(x, center, self.stages)]

    @property
    def size(self) -> int:
        return self.layers[0].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes the bank holds (its fp16 layers and fp32 centres): what it costs in a cache tier."""
        return sum(t.numel() * t.element_size() for t in [*self.layers, *(self.centers or [])])

    def to(self, device: torch.device | str) -> MemoryBank:
        """Move the stored bank (used by the adapter cache's device/CPU tiers)."""
        self.layers = [layer.to(device) for layer in self.layers]
        if self.centers is not None:
            self.centers = [c.to(device) for c in self.centers]
        return self

    def distances(self, features: Features, precision: str | None = None) -> torch.Tensor:
        """(B, h, w): per layer (1 - max cosine)/2 to the bank, so 0 = seen before and 1 = opposite; averaged.

        ``precision`` (``fp32`` / ``bf16`` / ``fp16``) is the compute dtype; None: ``memory_precision`` of the
        features' device at half precision. Products multiply in that dtype; the max and what follows are fp32."""
        if len(features.patches) != len(self.layers):
            raise ValueError(f"memory bank has {len(self.layers)} layers, features have {len(features.patches)}")
        h, w = features.grid
        query0 = features.patches[0]
        batch = query0.shape[0]
        compute = COMPUTE_DTYPE[precision or memory_precision(query0.device, "fp16")]
        total = torch.zeros(batch * h * w, device=query0.device)
        terms = 0
        for layer, query in enumerate(features.patches):
            if query.shape[-1] != self.layers[layer].shape[-1]:
                raise ValueError(f"feature dim {query.shape[-1]} does not match memory dim "
                                 f"{self.layers[layer].shape[-1]}")
            # The compute form (centred, per stage, in the compute dtype) is derived here, one layer at a time, and
            # never kept: it costs one pass over the bank against the chunks' pass per query patch, and keeping
            # it would hold a second copy of every bank in the cache tiers.
            parts = self._shift(self.layers[layer].to(query.device), layer, compute)
            pools = self.pools or [1] * len(parts)
            flats = self._shift(query.reshape(-1, query.shape[-1]), layer, compute)
            for flat, bank, pool in zip(flats, parts, pools, strict=True):
                if pool > 1:
                    flat = _strided(flat, (batch, h, w), pool)
                nearest = _nearest(flat, bank, compute)
                total += nearest if pool == 1 else _upsampled(nearest, (batch, h, w), pool)
                terms += 1
        return (total / terms).view(batch, h, w)


def _nearest(flat: torch.Tensor, bank: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """(N,) fp32: (1 - the largest cosine of each row of ``flat`` with ``bank``)/2, in chunks of SIM_BUDGET."""
    flat, bank, offset = _shifted(flat, bank) if compute == torch.bfloat16 else (flat, bank, 0.0)
    out = torch.empty(flat.shape[0], device=flat.device)
    chunk = max(128, SIM_BUDGET // max(1, bank.shape[0]))
    for start in range(0, flat.shape[0], chunk):
        sim = (flat[start : start + chunk] @ bank.t()).amax(dim=1).float() + offset
        out[start : start + chunk] = (1 - sim.clamp(-1, 1)) / 2
    return out


def _strided(flat: torch.Tensor, shape: tuple[int, int, int], pool: int) -> torch.Tensor:
    """(B*h*w, D) rows on the grid -> (B*ceil(h/p)*ceil(w/p), D): the cells at every p-th row and column."""
    batch, h, w = shape
    return flat.reshape(batch, h, w, -1)[:, ::pool, ::pool].reshape(-1, flat.shape[-1])


def _upsampled(near: torch.Tensor, shape: tuple[int, int, int], pool: int) -> torch.Tensor:
    """Distances at the cells ``_strided`` took -> (B*h*w,) on the grid: exact there, bilinear between them (cell
    i lies at i / p of the sampled grid, which ``align_corners=True`` maps exactly), the last one held beyond."""
    batch, h, w = shape
    rows, cols = -(-h // pool), -(-w // pool)
    sampled = near.view(batch, 1, rows, cols)
    up = F.interpolate(sampled, size=(pool * (rows - 1) + 1, pool * (cols - 1) + 1), mode="bilinear",
                       align_corners=True)
    up = F.pad(up, (0, max(0, w - up.shape[-1]), 0, max(0, h - up.shape[-2])), mode="replicate")
    return up[:, 0, :h, :w].reshape(-1)


def _shifted(flat: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``flat`` and ``bank`` with a column of 1 and of -1 appended, and the 1 to add back: their products are then
    cosine - 1, accumulated in fp32 and rounded to bf16 only at the end. bf16 keeps 8 significant bits, so a
    cosine near 1 would come back in steps of 2^-8; cosine - 1 near 0 comes back in steps of 2^-8 of its own
    size, which halves the largest distance error on the shared sets' features (1.4e-3 -> 7.5e-4)."""
    return (torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1),
            torch.cat([bank, bank.new_full((bank.shape[0], 1), -1.0)], dim=1), 1.0)


def _split(x: torch.Tensor, stages: Sequence[int] | None) -> list[torch.Tensor]:
    """(N, D) -> one re-normalised (N, width) slice per stage; ``[x]`` itself without stages."""
    if stages is None:
        return [x]
    return [F.normalize(part, dim=-1) for part in x.split(stages, dim=-1)]


def _scored_parts(x: torch.Tensor, center: torch.Tensor | None, stages: Sequence[int] | None) -> list[torch.Tensor]:
    """(N, D) -> the fp32 unit vectors cosines are taken between: one per stage, centred on ``center``'s slice."""
    parts = _split(x.float(), stages)
    if center is None:
        return parts
    centers = center.split(stages or [x.shape[-1]])
    return [F.normalize(part - c, dim=-1) for part, c in zip(parts, centers, strict=True)]
