"""Aggregation over seeds and the written outputs: results.json, results.md and the two plots.

Everything needed to reproduce a table row goes into results.json: the raw per-seed records
(including which shot files were used), the aggregates, the command line and the settings.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import platform
import shlex
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .metrics import DECISION_METRICS, QUALITY_METRICS

if TYPE_CHECKING:
    from .protocol import ProtocolResult

TIME_METRICS = ("register_s", "finetune_s", "ms_per_image")
DECISION_COLUMNS = (*DECISION_METRICS, "f1_gap", "threshold")
ALL_METRICS = QUALITY_METRICS + TIME_METRICS + DECISION_COLUMNS
PER_DEFECT = "recall:"  # metric-name prefix of the per-defect-type recalls
MEAN_CATEGORY = "mean"  # the across-category row, as in papers' "Mean" row
_COLUMNS = {  # metric -> (column header, scale, decimals)
    "image_auroc": ("image AUROC", 100.0, 1), "pixel_auroc": ("pixel AUROC", 100.0, 1),
    "aupro": ("AUPRO", 100.0, 1), "image_f1max": ("image F1-max", 100.0, 1),
    "pixel_f1max": ("pixel F1-max", 100.0, 1), "register_s": ("register s", 1.0, 2),
    "finetune_s": ("fine-tune s", 1.0, 2), "ms_per_image": ("ms/image", 1.0, 1),
    "accuracy": ("accuracy", 100.0, 1), "recall": ("defect recall", 100.0, 1),
    "false_alarm_rate": ("false alarms on good", 100.0, 1), "precision": ("precision", 100.0, 1),
    "f1_at_threshold": ("F1 at threshold", 100.0, 1), "f1_gap": ("F1-max − F1", 100.0, 1),
    "threshold": ("threshold", 1.0, 4),
}
QUALITY_COLUMNS = QUALITY_METRICS + TIME_METRICS


def _mean_std(values: Sequence[float]) -> dict[str, float | int]:
    """Mean and sample std (ddof=1; 0 for a single seed) so spreads from few seeds are not understated."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(np.std(arr, ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(np.mean(arr)), "std": std, "n": int(arr.size)}


def _metric_names(metrics: dict[str, Any]) -> list[str]:
    """The fixed metrics in table order, then the per-defect recalls this record has."""
    return [m for m in ALL_METRICS if m in metrics] + sorted(m for m in metrics if m.startswith(PER_DEFECT))


def aggregate(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (category, mode, shots), plus a ``"mean"`` category.

    The mean row first averages over categories within each seed, then takes mean ± std over
    seeds, so its std is the seed-to-seed spread of the benchmark average (not category spread).
    NaN metrics stay NaN (undefined metrics must stay visible, not be averaged away).
    """
    groups: dict[tuple[str, str, int], dict[int, dict[str, float]]] = defaultdict(dict)
    for rec in records:
        groups[(rec["category"], rec["mode"], int(rec["shots"]))][int(rec["seed"])] = rec["metrics"]
    categories = {cat for cat, _, _ in groups}
    if len(categories) > 1:
        per_seed: dict[tuple[str, int], dict[int, list[dict[str, float]]]] = defaultdict(
            lambda: defaultdict(list))
        for (_cat, mode, k), by_seed in groups.items():
            for seed, metrics in by_seed.items():
                per_seed[(mode, k)][seed].append(metrics)
        for (mode, k), seed_lists in per_seed.items():
            groups[(MEAN_CATEGORY, mode, k)] = {
                seed: {m: float(np.mean([x[m] for x in lst])) for m in _metric_names(lst[0])
                       if all(m in x for x in lst)}
                for seed, lst in seed_lists.items()}
    rows = []
    for (cat, mode, k), by_seed in groups.items():
        seeds = sorted(by_seed)
        names = [m for m in _metric_names(by_seed[seeds[0]]) if all(m in by_seed[s] for s in seeds)]
        rows.append({"category": cat, "mode": mode, "shots": k, "seeds": seeds,
                     "metrics": {m: _mean_std([by_seed[s][m] for s in seeds]) for m in names}})
    rows.sort(key=lambda r: (r["mode"], r["category"] == MEAN_CATEGORY, r["category"], r["shots"]))
    return rows


def _fmt(stat: dict[str, float | int] | None, scale: float, decimals: int) -> str:
    if stat is None:
        return "–"
    mean = f"{stat['mean'] * scale:.{decimals}f}"
    return mean if stat["n"] < 2 else f"{mean} ± {stat['std'] * scale:.{decimals}f}"


def _table(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    headers = [_COLUMNS[m][0] if m in _COLUMNS else f"recall {m[len(PER_DEFECT):]}" for m in metrics]
    lines = ["| " + " | ".join(["category", "shots", *headers]) + " |", "|" + "---|" * 2 + "---:|" * len(metrics)]
    for r in rows:
        cells = [_fmt(r["metrics"].get(m), *_COLUMNS.get(m, ("", 100.0, 1))[1:]) for m in metrics]
        cat = f"**{r['category']}**" if r["category"] == MEAN_CATEGORY else r["category"]
        lines.append("| " + " | ".join([cat, str(r["shots"]), *cells]) + " |")
    return lines


def markdown_table(rows: Sequence[dict[str, Any]], *, command: str = "") -> str:
    """Paper-style tables per mode (rows category × shots): ranking quality, then the decisions at the
    adapter's own threshold (when it has one) with recall per defect type."""
    lines = ["# Evaluation results", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["Values are mean ± sample std over seeds (a single seed shows the value alone). "
              "Quality metrics in %; AUPRO integrated to FPR 0.3. Decisions use `score > threshold` with the "
              "threshold the adapter calibrated itself (no test image is used to choose it).", ""]
    for mode in sorted({r["mode"] for r in rows}):
        sel = [r for r in rows if r["mode"] == mode]
        lines += [f"## mode: {mode}", "", *_table(sel, QUALITY_COLUMNS), ""]
        decided = [r for r in sel if "f1_at_threshold" in r["metrics"]]
        if decided:
            per_defect = sorted({m for r in decided for m in r["metrics"] if m.startswith(PER_DEFECT)})
            lines += ["### decisions at the adapter's own threshold", "",
                      *_table(decided, [*DECISION_COLUMNS, *per_defect]), ""]
    return "\n".join(lines)


def write_scores_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """One line per image and run: enough to check any single verdict by hand."""
    fields = ["category", "shots", "seed", "file", "label", "defect", "score", "threshold", "verdict"]
    out = Path(path)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return out


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> null (strict JSON), numpy scalars -> Python, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("clipshot", "torch", "open_clip_torch", "numpy", "scipy", "scikit-learn"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def write_results(out_dir: str | Path, records: Sequence[dict[str, Any]], *,
                  command: str | Sequence[str], settings: dict[str, Any]) -> dict[str, Path]:
    """Write results.json (raw + aggregated + command + settings) and results.md; return paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmd = command if isinstance(command, str) else shlex.join(command)
    rows = aggregate(records)
    payload = {"command": cmd, "settings": settings, "versions": _versions(),
               "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
               "metrics": list(ALL_METRICS), "records": list(records), "aggregated": rows}
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")
    md_path.write_text(markdown_table(rows, command=cmd) + "\n")
    return {"results.json": json_path, "results.md": md_path}


def write_outputs(out_dir: str | Path, result: ProtocolResult, *, command: str | Sequence[str],
                  settings: dict[str, Any] | None = None) -> dict[str, Path]:
    """Everything the ``clipshot eval`` command leaves behind: JSON, markdown and both plots.

    ``settings`` (backbone spec, weights hash, device, ...) is merged over the protocol's own.
    """
    from .plots import plot_examples, plot_shots  # matplotlib only when plots are written

    paths = write_results(out_dir, result.records, command=command,
                          settings={**result.settings, **(settings or {})})
    if result.scores:
        paths["scores.csv"] = write_scores_csv(Path(out_dir) / "scores.csv", result.scores)
    paths["shots.png"] = plot_shots(aggregate(result.records), Path(out_dir) / "shots.png")
    if result.examples:
        paths["examples.png"] = plot_examples(result.examples, Path(out_dir) / "examples.png")
    return paths
