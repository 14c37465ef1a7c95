"""The accuracy suite: the gate for every scoring or calibration default (not part of the test suite).

Every dataset in MVTec AD layout under ``--data`` (any folder holding ``<category>/train/good`` and
``<category>/test``, found by walking the tree: no dataset names in this file) is run with what a new user gets —
``Detector.fit_memory`` with the shipped defaults, the registration geometry rule, the offline backbone — at 1, 4 and
16 shots, seeds 0-2 (0-4 at 4 shots). One table: image / pixel AUROC, AUPRO, image F1-max, F1 at the adapter's own
threshold, recall, false alarms (mean and worst seed), the false-alarm rate the adapter *predicted* against the rate
it *realised* on the test goods, and ms/image; then the difference to the previous run in ``--out`` (or
``--baseline``), and the house rule applied to it: a default changes only if no dataset loses more than 1 point of
image AUROC, pixel AUROC or F1 at threshold.

CPU budget: the backbone is frozen in memory mode, so a feature depends only on the pixels it is given. Features are
cached by a digest of the exact pixel tensor, so the test set is extracted once per dataset and geometry, not once
per seed, and ``--variant`` runs (other scoring settings, same shots) re-use every extraction. Scoring, calibration
and maps run through the unchanged ``Detector`` code. Pixel metrics use 256-px masks (``--mask-size``).

    python benchmarks/accuracy_suite.py --data ../shared/data --out docs/results/suite
    python benchmarks/accuracy_suite.py --data ../shared/data --out /tmp/s --variant memory_center=false \\
        --baseline docs/results/suite/results.json          # a candidate default against the shipped one
    python benchmarks/accuracy_suite.py --out docs/results/int8 --shots 4 --seeds 0 1 2 --runtime onnxruntime \\
        --quantize int8 --baseline docs/results/suite/results.json  # features through an int8 graph per seed

``--runtime`` computes every feature (shots, synthetic defects, tests) through ONNX Runtime or OpenVINO;
``--quantize int8`` through an int8 graph calibrated on that seed's shots only (at the geometry the fit chooses),
so each seed has its own graph and the test set is extracted once per seed. The comparison then uses only the
baseline's records of the seeds run here. ``--resize`` fixes the geometry's resize mode for every product (as a
registration naming it), to screen the geometry rule, e.g. on ``benchmarks/variable_size.py``'s derived sets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import tempfile
import time
from collections import OrderedDict, defaultdict
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipshot.backbone import load_backbone
from clipshot.detector import Detector
from clipshot.evaluation import run_protocol
from clipshot.evaluation.dataset import list_categories
from clipshot.features import Features
from clipshot.fusion import ScoringConfig
from clipshot.geometry import RESIZE_MODES

PLAN = ((1, (0, 1, 2)), (4, (0, 1, 2, 3, 4)), (16, (0, 1, 2)))  # (shots, seeds)
GATE_POINTS = 1.0  # the house rule: no dataset may lose more than this many points on a gated metric
GATED = ("image_auroc", "pixel_auroc", "f1_at_threshold")
COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "f1_at_threshold", "recall", "false_alarm_rate")
CACHE_BYTES = 6 << 30  # features kept across runs; the test sets of the shared datasets need well under this


class CachedDetector(Detector):
    """``Detector`` whose backbone forward is memoised by the exact pixels (memory mode: frozen weights)."""

    def __init__(self, *args: Any, disk: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cache: OrderedDict[tuple, Features] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0
        self.disk = disk  # optional folder shared by several suite processes (same backbone)

    def _tag(self) -> str:
        """What besides the pixels decides a feature: the runtime and, for int8, the shots that calibrated it."""
        runtime = self.runtime
        if runtime is None:
            return "torch"
        return f"{runtime.name}-{runtime.quantize}-{runtime.calibration_digest}" if runtime.quantize else runtime.name

    def features(self, pixels: torch.Tensor, adapter: Any, *, dpam: bool = False) -> Features:
        if adapter is not None and getattr(adapter, "lora", None) is not None:
            return super().features(pixels, adapter, dpam=dpam)
        data = pixels.detach().cpu().contiguous()
        digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()
        key = (tuple(data.shape), dpam, digest, self._tag())
        if key in self._cache:
            self.hits += 1
            self._cache.move_to_end(key)
            return self._cache[key]
        tag = "" if self.runtime is None else f"{self._tag()}-"
        name = f"{self.backbone.spec.replace(':', '_')}-{tag}{int(dpam)}-{digest}.pt"
        path = None if self.disk is None else self.disk / name
        if path is not None and path.exists():
            self.hits += 1
            feats = torch.load(path, weights_only=False)  # our own files, written below
        else:
            self.misses += 1
            feats = super().features(pixels, adapter, dpam=dpam)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{time.time_ns()}.tmp")
                torch.save(feats, tmp)
                tmp.replace(path)
        self._cache[key] = feats
        self._bytes += _nbytes(feats)
        while self._bytes > CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= _nbytes(old)
        return feats


def _nbytes(feats: Features) -> int:
    tensors = [*feats.patches, *([] if feats.cls is None else [feats.cls])]
    return sum(t.numel() * t.element_size() for t in tensors)


def discover(root: Path) -> list[tuple[str, Path, str]]:
    """(name, parent folder, category) of every MVTec-layout category below ``root``, sorted."""
    found = []
    for train in sorted(root.rglob("train/good")):
        category_dir = train.parent.parent
        if category_dir.name in list_categories(category_dir.parent):
            found.append((str(category_dir.relative_to(root)), category_dir.parent, category_dir.name))
    return found


def parse_variant(spec: str) -> dict[str, Any]:
    """``key=value[,key=value]`` overrides of ``ScoringConfig`` (booleans, numbers and names); ``default`` = none."""
    known = {f.name: f.type for f in fields(ScoringConfig)} | {"choose": bool}  # choose=on: per-product selection
    out: dict[str, Any] = {}
    for item in ([] if spec == "default" else spec.split(",")):
        key, _, raw = item.partition("=")
        if key not in known or not raw:
            raise SystemExit(f"--variant {item!r}: expected KEY=VALUE with KEY one of {', '.join(known)}")
        value: Any = raw
        if known[key] in (str, "str"):  # a named mode ("off" is a name here, not False)
            pass
        elif raw.lower() in ("true", "false", "on", "off"):
            value = raw.lower() in ("true", "on")
        else:
            try:
                value = float(raw) if "." in raw else int(raw)
            except ValueError:
                value = raw
        out[key] = value
    return out


def make_factory(detector: Detector, variant: dict[str, Any], facts: dict[tuple, dict], resize: str | None = None):
    """Adapters exactly as registration builds them (``fit_memory``, its geometry rule and defaults), with the
    variant's scoring overrides; the calibration's own predictions are kept in ``facts`` per run. ``resize``: the
    geometry's resize mode as a registration naming it gets (the rest of the auto rule unchanged)."""

    def make_adapter(shots: list[Image.Image], k: int, seed: int, *, category: str):
        start = time.perf_counter()
        choose = bool(variant.get("choose"))
        overrides = {k: v for k, v in variant.items() if k != "choose"}
        scoring = replace(ScoringConfig(), **overrides) if overrides else None
        sizes = [img.size for img in shots]
        geometry = None if resize is None else detector.plan_geometry(sizes, resize=resize)
        if detector.runtime is not None and detector.runtime.quantize:  # int8: calibrated on these shots only
            detector.runtime.calibrate(detector.backbone.preprocess(shots, detector.resolve_geometry(geometry, sizes)))
        adapter = detector.fit_memory(shots, category=category, scoring=scoring, choose_scoring=choose,
                                      geometry=geometry)
        cal = adapter.calibration
        facts[(category, seed, k)] = {
            "predicted_false_alarm_rate": None if cal is None else cal.expected_false_alarm_rate,
            "confident": None if cal is None else cal.confident,
            "scoring": adapter.scoring.to_dict(),
            "selection": None if adapter.selection is None else adapter.selection.get("chosen"),
            "position_baseline": None if adapter.baseline_choice is None else adapter.baseline_choice["chosen"],
            "verdicts": adapter.threshold is not None,
            "geometry": adapter.geometry.to_dict() if hasattr(adapter.geometry, "to_dict") else None,
        }
        return adapter, time.perf_counter() - start, 0.0

    return make_adapter


def run_suite(args: argparse.Namespace, detector: CachedDetector, variant: dict[str, Any]) -> dict[str, Any]:
    plan = [(k, seeds) for k, seeds in PLAN if not args.shots or k in args.shots]
    if args.seeds is not None:
        plan = [(k, tuple(s for s in seeds if s in args.seeds)) for k, seeds in plan]
    datasets = discover(args.data)
    if args.datasets:
        datasets = [d for d in datasets if any(sel in d[0] for sel in args.datasets)]
    if not datasets:
        raise SystemExit(f"no MVTec-layout dataset under {args.data}")
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name, parent, category in datasets:
        facts: dict[tuple, dict] = {}
        for k, seeds in plan:
            if not seeds:
                continue
            result = run_protocol(parent, detector, make_factory(detector, variant, facts, args.resize), mode="memory",
                                  categories=[category], shots=[k], seeds=list(seeds), mask_size=args.mask_size,
                                  examples_per_defect=0, progress=False)
            for rec in result.records:
                rec["dataset"] = name
                rec.update(facts[(category, rec["seed"], rec["shots"])])
                records.append(rec)
                if args.partial is not None:  # every run as it ends: a killed suite keeps what it measured
                    with args.partial.open("a") as out:
                        out.write(json.dumps(rec, default=float) + "\n")
                m = rec["metrics"]
                print(f"{name} k={k} seed={rec['seed']}: image {100 * m['image_auroc']:.1f} pixel "
                      f"{100 * m['pixel_auroc']:.1f} F1@t {_pct(m.get('f1_at_threshold'))} false alarms "
                      f"{_pct(m.get('false_alarm_rate'))} (predicted {_pct(rec['predicted_false_alarm_rate'])}) "
                      f"{rec['selection'] or ''} {rec['position_baseline'] or ''}".rstrip(), flush=True)
    return {"records": records, "summary": summarise(records),
            "settings": {"backbone": args.backbone, "runtime": args.runtime, "quantize": args.quantize,
                         "memory_precision": detector.memory_precision, "variant": variant,
                         "resize": args.resize, "mask_size": args.mask_size,
                         "plan": [[k, list(s)] for k, s in plan], "command": ["python", *sys.argv],
                         "machine": f"{platform.machine()} {platform.processor() or ''} "
                                    f"{torch.get_num_threads()} torch threads".strip(),
                         "minutes": round((time.perf_counter() - started) / 60, 1),
                         "feature_cache": {"hits": detector.hits, "misses": detector.misses}}}


def _num(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _pct(value: float | None) -> str:
    return "null" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f} %"


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, shots): means over seeds, the worst seed's false alarms, the predicted rate, and how
    many seeds realised no more false alarms than predicted (a null prediction promises nothing and counts as
    held only in ``held_or_null``)."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for rec in records:
        groups[(rec["dataset"], rec["shots"])].append(rec)
    rows = []
    for (name, k), recs in sorted(groups.items()):
        row: dict[str, Any] = {"dataset": name, "shots": k, "seeds": len(recs)}
        for col in (*COLUMNS, "ms_per_image"):
            values = [r["metrics"][col] for r in recs if col in r["metrics"]]
            row[col] = float(np.nanmean(values)) if values else None
        alarms = [r["metrics"].get("false_alarm_rate", math.nan) for r in recs]
        row["false_alarm_rate_worst"] = None if all(map(math.isnan, alarms)) else float(np.nanmax(alarms))
        predicted = [r["predicted_false_alarm_rate"] for r in recs]
        numbers = [p for p in predicted if p is not None]
        row["predicted_false_alarm_rate"] = float(np.mean(numbers)) if numbers else None
        row["bound_held"] = sum(p is not None and a <= p + 1e-9 for p, a in zip(predicted, alarms, strict=True))
        row["bound_null"] = sum(p is None for p in predicted)
        row["no_verdict"] = sum(not r.get("verdicts", True) for r in recs)
        chosen = [r.get("selection") for r in recs if r.get("selection")]
        row["chosen"] = {name: chosen.count(name) for name in sorted(set(chosen))}
        rows.append(row)
    return rows


def baseline_rows(baseline: dict[str, Any], plan: list[tuple[int, tuple[int, ...]]]) -> list[dict[str, Any]]:
    """The baseline's summary over the seeds this run measures (its own summary when it measured no others)."""
    wanted = {(k, seed) for k, seeds in plan for seed in seeds}
    records = [r for r in baseline.get("records", []) if (r["shots"], r["seed"]) in wanted]
    return summarise(records) if records else baseline["summary"]


def compare(current: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """Per (dataset, shots) differences in points; the gate fails when any gated metric drops by more than
    ``GATE_POINTS``."""
    before = {(r["dataset"], r["shots"]): r for r in baseline}
    diffs, ok = [], True
    for row in current:
        old = before.get((row["dataset"], row["shots"]))
        if old is None:
            continue
        diff = {"dataset": row["dataset"], "shots": row["shots"]}
        for col in COLUMNS:
            if row.get(col) is not None and old.get(col) is not None:
                diff[col] = 100 * (row[col] - old[col])
        diff["fails_gate"] = [c for c in GATED if diff.get(c, 0.0) < -GATE_POINTS]
        ok &= not diff["fails_gate"]
        diffs.append(diff)
    return diffs, ok


def markdown(result: dict[str, Any], diffs: list[dict[str, Any]] | None, gate_ok: bool | None) -> str:
    s = result["settings"]
    runtime = s.get("runtime", "torch") + (f" {s['quantize']}" if s.get("quantize") else "") + (
        f", memory in {s['memory_precision']}" if s.get("memory_precision", "fp32") != "fp32" else "")
    resize = f", geometry resize {s['resize']}" if s.get("resize") else ""
    lines = [f"# Accuracy suite — `{s['backbone']}` ({runtime}), variant {s['variant'] or 'shipped defaults'}{resize}",
             "",
             f"Command: `{' '.join(s['command'])}` ({s['minutes']} min on {s['machine']}; feature cache "
             f"{s['feature_cache']['hits']} hits / {s['feature_cache']['misses']} extractions). Masks at "
             f"{s['mask_size']} px. Means over seeds; points = percent.", "",
             "| dataset | shots | seeds | image AUROC | pixel AUROC | AUPRO | image F1-max | F1 at threshold | "
             "recall | false alarms (mean / worst) | predicted false alarms | realised ≤ predicted | ms/image |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        cells = [_num(r[c]) for c in COLUMNS[:-1]]
        held = f"{r['bound_held']}/{r['seeds']}" + (f" ({r['bound_null']} null)" if r["bound_null"] else "")
        lines.append(f"| {r['dataset']} | {r['shots']} | {r['seeds']} | " + " | ".join(cells) +
                     f" | {_num(r['false_alarm_rate'])} / {_num(r['false_alarm_rate_worst'])} | "
                     f"{_pct(r['predicted_false_alarm_rate'])} | {held} | {r['ms_per_image']:.0f} |")
    chosen = [(r["dataset"], r["shots"], r.get("chosen")) for r in result["summary"] if r.get("chosen")]
    if chosen:
        lines += ["", "Scoring each product chose from its own shots (runs):", ""]
        lines += [f"- {name}, {k} shots: " + ", ".join(f"{c} × {n}" for c, n in picks.items())
                  for name, k, picks in chosen]
    if diffs is not None:
        lines += ["", f"## Difference to the baseline (points) — gate: {'PASS' if gate_ok else 'FAIL'}", "",
                  "| dataset | shots | image AUROC | pixel AUROC | AUPRO | image F1-max | F1 at threshold | recall | "
                  "false alarms | over the 1-point gate |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for d in diffs:
            cells = [f"{d[c]:+.1f}" if c in d else "—" for c in COLUMNS]
            lines.append(f"| {d['dataset']} | {d['shots']} | " + " | ".join(cells) +
                         f" | {', '.join(d['fails_gate']) or '—'} |")
    pairs = [r for r in result["summary"] if r["shots"] in (4, 16)]
    if pairs:
        held = sum(r["bound_held"] for r in pairs)
        total = sum(r["seeds"] for r in pairs)
        lines += ["", f"Predicted false-alarm rate held (realised ≤ predicted) on {held}/{total} (dataset, seed) "
                  "pairs at 4 and 16 shots."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="results.json to compare with (default: the one already in --out)")
    parser.add_argument("--backbone", default="imagenet:efficientnet-lite0")
    parser.add_argument("--variant", nargs="+", default=["default"], metavar="SPEC",
                        help="one or more KEY=VALUE[,KEY=VALUE] ScoringConfig overrides to measure instead of the "
                             "shipped defaults ('default' = none); several run in one process sharing the feature "
                             "cache, each into --out/<spec>/")
    parser.add_argument("--datasets", nargs="*", default=None, help="substrings of dataset paths to keep")
    parser.add_argument("--shots", type=int, nargs="*", default=None, help="subset of 1 4 16")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="subset of the plan's seeds")
    parser.add_argument("--mask-size", default="256")
    parser.add_argument("--partial", type=Path, default=None, help="append each run's record to this JSON-lines file")
    parser.add_argument("--feature-cache", type=Path, default=None,
                        help="folder to keep extracted features in, shared by suite processes on one machine")
    parser.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime", "openvino"),
                        help="what computes the features (graphs exported into --runtime-cache)")
    parser.add_argument("--quantize", default=None, choices=("int8",),
                        help="int8 graphs calibrated on each seed's shots only (needs --runtime other than torch)")
    parser.add_argument("--runtime-cache", type=Path, default=None, help="folder of exported graphs (default: temp)")
    parser.add_argument("--resize", default=None, choices=RESIZE_MODES,
                        help="geometry resize mode for every product, as a registration naming it (default: the "
                             "auto rule)")
    parser.add_argument("--memory-precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="what memory cosines are computed in (auto: the shipped rule for this CPU)")
    args = parser.parse_args()
    if args.quantize and args.runtime == "torch":
        parser.error("--quantize int8 needs --runtime onnxruntime or openvino")
    backbone = load_backbone(args.backbone, device="cpu", precision="fp32")
    runtime = None
    if args.runtime != "torch":
        from clipshot.runtimes import FeatureRuntime

        cache = args.runtime_cache or Path(tempfile.mkdtemp(prefix="suite-runtime-"))
        runtime = FeatureRuntime(args.runtime, cache, quantize=args.quantize)
    detector = CachedDetector(backbone, disk=args.feature_cache, runtime=runtime,
                              memory_precision=args.memory_precision)
    for spec in args.variant:
        out = args.out if len(args.variant) == 1 else args.out / spec.replace(",", "+").replace("=", "-")
        baseline_path = args.baseline or out / "results.json"
        result = run_suite(args, detector, parse_variant(spec))
        plan = [(k, tuple(seed for seed in seeds if args.seeds is None or seed in args.seeds))
                for k, seeds in PLAN if not args.shots or k in args.shots]
        baseline = baseline_rows(json.loads(baseline_path.read_text()), plan) if baseline_path.exists() else None
        diffs, gate_ok = compare(result["summary"], baseline) if baseline is not None else (None, None)
        result["diff"], result["gate_pass"] = diffs, gate_ok
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
        text = markdown(result, diffs, gate_ok)
        (out / "results.md").write_text(text)
        print(text, flush=True)


if __name__ == "__main__":
    main()
