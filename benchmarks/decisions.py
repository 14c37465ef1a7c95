"""Decision controls end to end through the HTTP app: cost of a threshold change, of feedback and of a shot
removal, and the verdicts before and after (not a test; needs an MVTec-layout category directory).

Rule (documented so anyone can repeat it): the first ``--shots`` files of ``train/good`` (sorted) register the
product; the sorted ``test/<class>`` files are split by index parity, even = the operator's half (its wrong
verdicts are fed back, at most 16 per label), odd = the evaluation half (reported). Offline backbone, memory.

    python benchmarks/decisions.py --data ../shared/data/mvtec_ad/bottle [--shots 4] [--rate 0.05]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app

ADMIN = {"Authorization": "Bearer admin"}
IMAGES = (".png", ".jpg", ".jpeg", ".bmp")


def files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def listing(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGES)


def verdicts(client: TestClient, samples: list[tuple[Path, bool]]) -> list[bool]:
    out = []
    for i in range(0, len(samples), 16):
        chunk = [p for p, _ in samples[i:i + 16]]
        r = client.post("/v1/categories/bench/predict", headers=ADMIN, params={"heatmap": "none"},
                        files=files(chunk))
        r.raise_for_status()
        out += [p["is_anomalous"] for p in r.json()["predictions"]]
    return out


def rates(flags: list[bool], samples: list[tuple[Path, bool]]) -> tuple[float, float]:
    goods = [f for f, (_, bad) in zip(flags, samples, strict=True) if not bad]
    bads = [f for f, (_, bad) in zip(flags, samples, strict=True) if bad]
    return sum(goods) / max(1, len(goods)), sum(bads) / max(1, len(bads))


def timed(call):
    start = time.perf_counter()
    r = call()
    r.raise_for_status()
    return r.json(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a category dir with train/good and test/*")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.05, help="target false-alarm rate to try")
    parser.add_argument("--backbone", default="imagenet:efficientnet-lite0")
    args = parser.parse_args()
    shots = listing(args.data / "train" / "good")[: args.shots]
    operator, evaluation = [], []
    for folder in sorted((args.data / "test").iterdir()):
        for i, path in enumerate(listing(folder)):
            (operator if i % 2 == 0 else evaluation).append((path, folder.name != "good"))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        settings = Settings(_env_file=None, backbone=args.backbone, store=Path(root), admin_keys=["admin"])
        with TestClient(create_app(settings)) as client:
            body, reg_s = timed(lambda: client.post("/v1/categories/bench/shots", headers=ADMIN, files=files(shots),
                                                    data={"finetune": "false"}))

            def report(step: str, seconds: float) -> None:
                decision = client.get("/v1/categories/bench", headers=ADMIN).json()["decision"]
                far, recall = rates(verdicts(client, evaluation), evaluation)
                rows.append((step, seconds, decision["threshold"], decision["expected_false_alarm_rate"],
                             decision["expected_recall"], far, recall))

            report(f"register {len(shots)} shots (auto)", reg_s)
            _, s = timed(lambda: client.put("/v1/categories/bench/threshold", headers=ADMIN,
                                            json={"target_false_alarm_rate": args.rate}))
            report(f"PUT threshold target {args.rate}", s)
            _, s = timed(lambda: client.put("/v1/categories/bench/threshold", headers=ADMIN, json={"policy": "auto"}))
            report("PUT threshold auto", s)
            flags = verdicts(client, operator)
            false_alarms = [p for f, (p, bad) in zip(flags, operator, strict=True) if f and not bad][:16]
            missed = [p for f, (p, bad) in zip(flags, operator, strict=True) if not f and bad][:16]
            if false_alarms:
                _, s = timed(lambda: client.post("/v1/categories/bench/feedback", headers=ADMIN,
                                                 data={"label": "good"}, files=files(false_alarms)))
                report(f"feedback {len(false_alarms)} false alarms", s)
            if missed:
                _, s = timed(lambda: client.post("/v1/categories/bench/feedback", headers=ADMIN,
                                                 data={"label": "defect"}, files=files(missed)))
                report(f"feedback {len(missed)} missed defects", s)
            sha = client.get("/v1/categories/bench/shots", headers=ADMIN).json()["shots"][0]["sha256"]
            _, s = timed(lambda: client.delete(f"/v1/categories/bench/shots/{sha}", headers=ADMIN))
            report("DELETE one shot", s)
    n_good = sum(not bad for _, bad in evaluation)
    print(f"{args.data.name}: {args.backbone}, evaluation half = {n_good} good / {len(evaluation) - n_good} "
          "defective images\n")
    print("| step | s | threshold | expected FAR | expected recall | FAR (eval half) | recall (eval half) |")
    print("|---|---:|---:|---:|---:|---:|---:|")

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    for step, s, t, efar, erec, far, recall in rows:
        print(f"| {step} | {s:.2f} | {t:.4f} | {fmt(efar)} | {fmt(erec)} | {far:.3f} | {recall:.3f} |")


if __name__ == "__main__":
    main()
