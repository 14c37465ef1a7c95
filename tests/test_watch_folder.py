"""`clipshot watch`: a real loopback service, real files written the way cameras write them, real inotify events."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from app.cli.hot_folder import DONE_DIR, FAILED_DIR, HotFolder
from app.cli.main import main
from app.cli.watch import service_inspector
from app.client import Client
from tests.helpers import waiting
from tests.helpers.predict import good, png
from tests.helpers.serving import served_widget

ADMIN_KEY, CLIENT_KEY = "admin-key", "client-key"
SETTLE_S = 0.3  # quiet period after the writer closed the file; short so the test is quick
TIMEOUT_S = 60  # a tiny-CLIP prediction takes well under a second; this only bounds a broken run


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_backbone):
    with served_widget(tmp_path_factory.mktemp("watch-store"), tiny_backbone, ADMIN_KEY, CLIENT_KEY) as url:
        yield url


def scored(url: str) -> float:
    """Images the service has scored for `widget` so far (its own Prometheus counter)."""
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("clipshot_predictions_total{") and 'category="widget"' in line)


def watch_in_thread(url: str, folder, *extra: str) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    args = ["watch", str(folder), "--category", "widget", "--url", url, "--key", CLIENT_KEY,
            "--settle-s", str(SETTLE_S), *(extra or ["--once"])]
    thread = threading.Thread(target=lambda: codes.append(main(args)), daemon=True)
    thread.start()
    return thread, codes


def wait_until(condition, timeout: float = TIMEOUT_S) -> bool:
    return waiting.wait_until(condition, timeout)


@pytest.mark.parametrize("watch_first", [True, False], ids=["camera-starts-later", "camera-already-writing"])
def test_a_half_written_image_is_not_read_until_its_writer_closes_it(served, tmp_path, watch_first):
    folder = tmp_path / "cam"
    folder.mkdir()
    data = png(good(70))
    before = scored(served)
    if watch_first:
        thread, codes = watch_in_thread(served, folder, "--max-files", "1")
        time.sleep(SETTLE_S)
    with open(folder / "part-1.png", "wb") as camera:
        camera.write(data[: len(data) // 2])
        camera.flush()
        if not watch_first:
            thread, codes = watch_in_thread(served, folder)
        time.sleep(SETTLE_S * 5)  # the camera pauses far longer than the quiet period mid-file
        assert (folder / "part-1.png").exists() and scored(served) == before, "read a half-written file"
        camera.write(data[len(data) // 2:])
    thread.join(TIMEOUT_S)
    assert codes == [0]
    assert not list((folder / FAILED_DIR).iterdir())
    sidecar = json.loads((folder / DONE_DIR / "part-1.png.json").read_text())
    assert (folder / DONE_DIR / "part-1.png").read_bytes() == data
    with Client(served, CLIENT_KEY) as client:  # the sidecar holds what the service answers for these bytes
        answer = client.predict("widget", [data], heatmap="none").predictions[0]
    assert sidecar["score"] == pytest.approx(answer.score) and sidecar["sha256"] == answer.sha256
    assert sidecar["part_id"] == "part-1" and sidecar["verdict"] in ("normal", "anomalous")
    assert scored(served) == before + 2  # the watch's one request, and the check just above


def test_a_rejected_image_goes_to_failed_with_its_reason_and_others_are_left_alone(served, tmp_path):
    folder = tmp_path / "cam"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    (folder / "notes.txt").write_text("not an image: not touched")
    (folder / "upload.png.part").write_bytes(b"an FTP upload in progress")
    thread, codes = watch_in_thread(served, folder)
    thread.join(TIMEOUT_S)
    assert codes == [0]
    sidecar = json.loads((folder / FAILED_DIR / "broken.png.json").read_text())
    assert sidecar["outcome"] == "failed" and sidecar["error"] and (folder / FAILED_DIR / "broken.png").exists()
    assert (folder / "notes.txt").exists() and (folder / "upload.png.part").exists()
    assert not list((folder / DONE_DIR).iterdir())


class Crash(Exception):
    """Stands for the process dying between the ledger's commit and the move."""


def test_a_restart_finishes_the_move_without_inspecting_again(served, tmp_path, monkeypatch):
    folder = tmp_path / "cam"
    folder.mkdir()
    (folder / "part-2.png").write_bytes(png(good(71)))
    before = scored(served)
    with Client(served, CLIENT_KEY) as client:
        first = HotFolder(folder, service_inspector(client, "widget", "l1", None), settle_s=SETTLE_S)

        def die(*_args):
            raise Crash

        monkeypatch.setattr(first, "_move", die)
        first.start()
        with pytest.raises(Crash):
            assert wait_until(lambda: first.run_once() or False)
        first.stop()
        assert (folder / "part-2.png").exists() and scored(served) == before + 1
        second = HotFolder(folder, service_inspector(client, "widget", "l1", None), settle_s=SETTLE_S)
        second.start()
        assert wait_until(lambda: second.run_once() == 1)
        second.stop()
    assert scored(served) == before + 1, "the restart inspected the file again"
    assert json.loads((folder / DONE_DIR / "part-2.png.json").read_text())["line"] == "l1"
    # and the same bytes dropped again under the same name are recognised too
    (folder / "part-2.png").write_bytes(png(good(71)))
    thread, codes = watch_in_thread(served, folder)
    thread.join(TIMEOUT_S)
    assert codes == [0] and scored(served) == before + 1


def test_an_unwritable_folder_or_unknown_product_is_one_line(served, tmp_path, capsys):
    folder = tmp_path / "cam"
    folder.mkdir()
    (folder / DONE_DIR).write_text("a file where the done folder should be")
    assert main(["watch", str(folder), "--category", "widget", "--url", served, "--once"]) == 2
    assert "must be writable" in capsys.readouterr().err
    other = tmp_path / "cam2"
    other.mkdir()
    assert main(["watch", str(other), "--category", "nope", "--url", served, "--key", CLIENT_KEY, "--once"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nope" in err and "404" in err


def test_watch_publishes_each_verdict_to_the_broker_itself(served, tmp_path, monkeypatch):
    from mqtt_broker import Subscriber, running_broker

    folder = tmp_path / "cam"
    folder.mkdir()
    (folder / "part-3.png").write_bytes(png(good(72)))
    with running_broker(tmp_path / "broker") as broker:
        subscriber = Subscriber(broker.port, "clipshot/#", client_id="watch")
        monkeypatch.setenv("CLIPSHOT_MQTT_HOST", "127.0.0.1")
        monkeypatch.setenv("CLIPSHOT_MQTT_PORT", str(broker.port))
        thread, codes = watch_in_thread(served, folder, "--once", "--mqtt", "--line", "L2", "--camera", "top")
        thread.join(TIMEOUT_S)
        assert codes == [0]
        assert wait_until(lambda: len(subscriber.messages) == 1)
        subscriber.close()
    sidecar = json.loads((folder / DONE_DIR / "part-3.png.json").read_text())
    message = subscriber.messages[0]
    assert subscriber.topics == ["clipshot/L2/widget/result"]
    assert message["part_id"] == "part-3" and message["camera"] == "top" and message["sha256"] == sidecar["sha256"]
    assert message["score"] == sidecar["score"] and message["verdict"] == sidecar["verdict"]


def test_an_outbox_that_cannot_be_opened_names_the_folder_not_the_store(served, tmp_path, monkeypatch, capsys):
    from mqtt_broker import running_broker

    from app.cli.hot_folder import STATE_DIR

    folder = tmp_path / "cam"
    (folder / STATE_DIR / "mqtt-outbox.sqlite3").mkdir(parents=True)  # a folder where the database should be
    with running_broker(tmp_path / "broker") as broker:
        monkeypatch.setenv("CLIPSHOT_MQTT_HOST", "127.0.0.1")
        monkeypatch.setenv("CLIPSHOT_MQTT_PORT", str(broker.port))
        code = main(["watch", str(folder), "--category", "widget", "--url", served, "--key", CLIENT_KEY,
                     "--once", "--mqtt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "FOLDER" in err[0] and "CLIPSHOT_STORE" not in err[0], err
