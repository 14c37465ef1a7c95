"""`clipshot predict` on a folder: against a real loopback server (--url) and in-process on a copy of the
same store (--store), which must agree row for row; CSV/JSON out, overlays and masks, exit codes."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from threaded_server import free_port

from app.cli.main import main
from app.client import Client
from app.jobs.job_store import JobState, JobStore
from tests.helpers.predict import defect, good, png
from tests.helpers.serving import served_widget

ADMIN_KEY, CLIENT_KEY = "admin-key", "client-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_backbone):
    """A server whose store holds `widget`, registered from four good shots (memory adapter only)."""
    store = tmp_path_factory.mktemp("store")
    with served_widget(store, tiny_backbone, ADMIN_KEY, CLIENT_KEY) as url:
        yield url, store


@pytest.fixture()
def folder(tmp_path):
    """A line's folder: two good parts and a defect (one in a subfolder), plus a file that is no image."""
    root = tmp_path / "parts"
    (root / "b").mkdir(parents=True)
    (root / "a1.png").write_bytes(png(good(50)))
    (root / "a2.png").write_bytes(png(good(51, size=(96, 72))))
    (root / "b" / "a1.png").write_bytes(png(defect(52)))  # same name, other folder: outputs must not collide
    (root / "notes.txt").write_text("not an image, not collected")
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_against_a_running_service(served, folder, tmp_path, capsys):
    url, _ = served
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # the service rejects it with a 400
    out, overlays, masks = tmp_path / "out.csv", tmp_path / "overlays", tmp_path / "masks"
    code = main(["predict", str(folder), "--url", url, "--key", CLIENT_KEY, "--category", "widget", "--out", str(out),
                 "--overlays", str(overlays), "--masks", str(masks), "--batch", "2", "--progress"])
    err = capsys.readouterr().err
    assert code == 1, err  # one image failed: the run says so in its exit code
    assert "100%" in err and "3 scored, " in err and "1 failed" in err
    rows = {r["file"]: r for r in read_csv(out)}
    assert set(rows) == {str(folder / n) for n in ("a1.png", "a2.png", "b/a1.png", "broken.png")}
    broken = rows[str(folder / "broken.png")]
    assert broken["verdict"] == "error" and broken["error"] and broken["score"] == ""
    with Client(url, CLIENT_KEY) as client:  # the rows are what the API answers for the same files
        paths = [folder / n for n in ("a1.png", "a2.png", "b/a1.png")]
        for path, pred in zip(paths, client.predict("widget", paths, heatmap="none").predictions, strict=True):
            row = rows[str(path)]
            assert float(row["score"]) == pytest.approx(pred.score, rel=1e-6) and row["sha256"] == pred.sha256
            assert row["verdict"] == ("anomalous" if pred.is_anomalous else "normal") and row["adapter_version"] == "1"
    for name, size in (("a1.png", (64, 64)), ("a2.png", (96, 72)), ("b/a1.png", (64, 64))):
        assert Image.open(overlays / name).size == size  # overlay at the image's own size
        mask = Image.open(masks / name)
        assert mask.mode == "L" and mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert not (overlays / "broken.png").exists()


def test_local_store_gives_the_same_rows_as_the_service(served, folder, tmp_path, capsys):
    url, store = served
    remote, local = tmp_path / "remote.json", tmp_path / "local.json"
    assert main(["predict", str(folder), "--url", url, "--key", CLIENT_KEY, "--category", "widget",
                 "--out", str(remote)]) == 0
    copy = shutil.copytree(store, tmp_path / "store-copy")
    with JobStore(copy) as jobs:  # a fine-tune the store's own server is running right now
        running = jobs.create("widget")
    assert main(["predict", str(folder), "--store", str(copy), "--backbone", "test:tiny-clip", "--device", "cpu",
                 "--category", "widget", "--out", str(local), "--no-progress"]) == 0
    with JobStore(copy) as jobs:  # the in-process service kept to a job database of its own
        assert jobs.get(running.id).state is JobState.queued
    remote_rows, local_rows = json.loads(remote.read_text()), json.loads(local.read_text())
    assert len(local_rows) == 3
    for a, b in zip(remote_rows, local_rows, strict=True):
        assert a["file"] == b["file"] and a["verdict"] == b["verdict"] and a["sha256"] == b["sha256"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)  # same weights, same pipeline, same bytes
    anomalous = any(r["verdict"] == "anomalous" for r in local_rows)
    capsys.readouterr()
    code = main(["predict", str(folder), "--url", url, "--key", CLIENT_KEY, "--category", "widget",
                 "--out", str(tmp_path / "x.csv"), "--fail-on-anomaly"])
    assert code == (3 if anomalous else 0)


@pytest.mark.parametrize(("extra", "message"), [
    (["--key", "wrong-key", "--category", "widget"], "Invalid API key"),
    (["--key", CLIENT_KEY, "--category", "nope"], "HTTP 404"),
    (["--key", CLIENT_KEY, "--category", "widget", "--store", "/tmp"], "not both"),
    (["--key", CLIENT_KEY, "--category", "widget", "--batch", "0"], "--batch"),
    (["--key", CLIENT_KEY, "--category", "widget", "--out", "/no/such/dir/x.csv"], "folder does not exist"),
])
def test_bad_runs_exit_2_with_one_line(served, folder, capsys, extra, message):
    url, _ = served
    assert main(["predict", str(folder), "--url", url, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipshot predict: error: ") and message in err and "\n" not in err


def test_missing_inputs_and_unreachable_service_exit_2(folder, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing-here"), "--category", "widget"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", str(folder), "--url", f"http://127.0.0.1:{free_port()}", "--category", "widget"]) == 2
    assert "cannot reach the service" in capsys.readouterr().err


def test_the_key_variable_is_not_reported_as_a_typo(tmp_path):
    from app.core.env import unknown_env_warnings

    assert unknown_env_warnings({"CLIPSHOT_KEY": "k"}, env_file=tmp_path / "none.env") == []
