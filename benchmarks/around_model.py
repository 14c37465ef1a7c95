"""CPU time of the work around the model on a predict (decode, resize to the model frame, the ``heatmap=jpeg``
overlay), per stage, this tree's code against a baseline tree's side by side in one run (not a test: numbers go
into docs/performance.md).

Real images and real maps: an ``imagenet:efficientnet-lite0`` memory adapter is fitted on 4 good shots of each
set (geometry planned as the service plans it), every timed image is scored once to get its map and map
threshold, then the stages are timed round-robin (baseline, new, baseline, ...) as this thread's CPU time
(``time.thread_time``), which other processes' load barely moves; the median per stage is reported. The
baseline's ``app/serving/heatmap.py`` and ``images.py`` are loaded from ``--baseline`` (a checkout of the old
commit, e.g. ``git worktree add /tmp/old main``); the resize is shared code. Parity is printed with the speed:
the largest difference between the two overlays' pixels before encoding.

``--resize-options`` also states what a cheaper resize of the model input would cost and move (Pillow
box-reducing before the bicubic from 1.0x the frame size instead of 1.5x; torch's vectorised uint8 antialiased
bicubic): its time, the largest change of a model input pixel and of an image score, on the same adapter.
Neither is shipped: see docs/performance.md. Only whole-image views (the shared sets' geometries).

    python benchmarks/around_model.py --baseline /tmp/old [--images 6] [--rounds 5] [--resize-options]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import clipshot.geometry as geometry_module  # noqa: E402
from app.serving import heatmap, images  # noqa: E402
from clipshot.backbone import load_backbone  # noqa: E402
from clipshot.detector import Detector  # noqa: E402
from clipshot.prediction import make_prediction  # noqa: E402

DATA = REPO.parent / "shared" / "data"
SETS = {  # name -> (good shots, test images)
    "bottle 900x900 PNG": (DATA / "mvtec_ad" / "bottle" / "train" / "good", DATA / "mvtec_ad" / "bottle" / "test"),
    "ball screw 1130x460 JPEG": (DATA / "bsdata" / "ball_screw" / "train" / "good",
                                 DATA / "bsdata" / "ball_screw" / "test"),
}
SUFFIXES = (".png", ".jpg", ".jpeg")


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)


def _cpu_ms(fn: Callable[[], object]) -> float:
    start = time.thread_time()
    fn()
    return 1000 * (time.thread_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout of the code to compare against")
    parser.add_argument("--images", type=int, default=6, help="test images per set, spread over its folders")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--resize-options", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    old_heatmap = _load(args.baseline / "app" / "serving" / "heatmap.py", "baseline_heatmap")
    old_images = _load(args.baseline / "app" / "serving" / "images.py", "baseline_images")
    backbone = load_backbone("imagenet:efficientnet-lite0", device="cpu")
    detector = Detector(backbone)
    print(f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; {args.images} images x {args.rounds} rounds per set, thread CPU ms, median\n")
    print("| image | stage | baseline ms | new ms | parity |\n|---|---|---:|---:|---|")
    for name, (shots_dir, test_dir) in SETS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = detector.fit_memory([Image.open(p).convert("RGB") for p in _files(shots_dir)[:args.shots]],
                                          category="bench", text=False, calibration_views=0)
        tests = _files(test_dir)
        tests = tests[:: max(1, len(tests) // args.images)][:args.images]
        cases = []
        for path in tests:
            data = path.read_bytes()
            image = images.decode_image(data, max_pixels=10**8, max_bytes=10**9).image
            score, heat = detector.forward(backbone.preprocess([image], adapter.geometry), adapter)
            grid = adapter.geometry.image_grid(heat[0], image.size, heat.shape[-1])
            threshold = make_prediction(float(score[0]), heat[0], adapter, image.size, None).map_threshold
            cases.append((data, image, grid, threshold))
        times: dict[str, list[float]] = {}
        worst = 0
        for _ in range(args.rounds):
            for data, image, grid, threshold in cases:
                for label, hm, im in (("baseline", old_heatmap, old_images), ("new", heatmap, images)):
                    times.setdefault(f"decode {label}", []).append(_cpu_ms(
                        lambda im=im, data=data: im.decode_image(data, max_pixels=10**8, max_bytes=10**9)))
                    times.setdefault(f"overlay {label}", []).append(_cpu_ms(
                        lambda hm=hm, image=image, grid=grid, threshold=threshold:
                        hm.render(image, grid, threshold, "jpeg")))
                times.setdefault("resize", []).append(_cpu_ms(
                    lambda image=image, geometry=adapter.geometry: backbone.preprocess([image], geometry)))
        for _data, image, grid, threshold in cases:
            before = old_heatmap.render(image, grid, threshold, "jpeg").picture
            after = heatmap.render(image, grid, threshold, "jpeg").picture
            worst = max(worst, int(np.abs(np.asarray(before, np.int16) - np.asarray(after, np.int16)).max()))

        def med(key: str, times: dict[str, list[float]] = times) -> float:
            return statistics.median(times[key])

        resize = med("resize")
        print(f"| {name} | decode | {med('decode baseline'):.1f} | {med('decode new'):.1f} | same code |")
        print(f"| {name} | resize + normalise | {resize:.1f} | {resize:.1f} | same code |")
        print(f"| {name} | JPEG overlay (map, blend, encode) | {med('overlay baseline'):.1f} | "
              f"{med('overlay new'):.1f} | max pixel diff {worst} |")
        total_old = med("decode baseline") + resize + med("overlay baseline")
        total_new = med("decode new") + resize + med("overlay new")
        print(f"| {name} | sum | {total_old:.1f} | {total_new:.1f} | |")
        if args.resize_options:
            _resize_options(name, detector, backbone, adapter, [c[1] for c in cases], args.rounds)


def _torch_render(self: geometry_module.Geometry, image: Image.Image, default_size: int) -> list[np.ndarray]:
    """``Geometry.render`` for whole-image views through torch's antialiased uint8 bicubic (vectorised)."""
    rgb = image.convert("RGB")
    fh, fw = self.frame_of(default_size)
    out = []
    for view in self.views(rgb.size, default_size):
        cx0, cy0, cx1, cy1 = view.content
        pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None]
        part = torch.nn.functional.interpolate(pixels, size=(cy1 - cy0, cx1 - cx0), mode="bicubic",
                                               antialias=True)[0].permute(1, 2, 0).numpy()
        canvas = np.full((fh, fw, 3), geometry_module.PAD, dtype=np.uint8)
        canvas[cy0:cy1, cx0:cx1] = part
        out.append(canvas)
    return out


def _resize_options(name: str, detector: Detector, backbone, adapter, pictures: list[Image.Image],
                    rounds: int) -> None:
    """What two cheaper resizes would save, and how far they move model inputs and image scores (same adapter,
    fitted on Pillow's resize): box-reducing from 1.0x the frame instead of 1.5x, and torch's uint8 bicubic."""
    shipped, render = geometry_module.REDUCING_GAP, geometry_module.Geometry.render
    results = {}
    for option in ("shipped", "reducing_gap 1.0", "torch antialiased bicubic"):
        geometry_module.REDUCING_GAP = 1.0 if option == "reducing_gap 1.0" else shipped
        geometry_module.Geometry.render = _torch_render if option.startswith("torch") else render
        ms = statistics.median(_cpu_ms(lambda p=p: backbone.preprocess([p], adapter.geometry))
                               for _ in range(rounds) for p in pictures)
        units = adapter.geometry.unit_bytes(pictures, backbone.image_size).to(torch.int16)
        scores = detector.forward(backbone.preprocess(pictures, adapter.geometry), adapter)[0]
        results[option] = (ms, units, scores)
    geometry_module.REDUCING_GAP, geometry_module.Geometry.render = shipped, render
    ms0, units0, scores0 = results["shipped"]
    for option in ("reducing_gap 1.0", "torch antialiased bicubic"):
        ms1, units1, scores1 = results[option]
        changed = (units0 - units1).abs()
        print(f"| {name} | resize, {option} (not shipped) | {ms0:.1f} | {ms1:.1f} | input max diff "
              f"{int(changed.max())} levels on {100 * float((changed > 0).float().mean()):.2f} % of values, "
              f"score max diff {float((scores0 - scores1).abs().max()):.1e} |")


if __name__ == "__main__":
    main()
