"""Verdicts to a real Mosquitto broker: what arrives, and that a broker crash and a service restart lose nothing.

The service runs for real on loopback (``threaded_server``), predictions go over HTTP, and a separate
persistent-session subscriber counts every delivery per ``message_id``.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time

import httpx
import pytest
from mqtt_broker import Broker, Subscriber, free_port, running_broker
from threaded_server import threaded_server

from app.client import Client
from app.core.config import Settings
from app.main import StartupError, start_mqtt
from app.serving.outbox import OUTBOX_FILENAME
from tests.helpers.predict import CLIENT, defect, files, good, png
from tests.helpers.waiting import wait_until

ADMIN_KEY = "admin-key"
DELIVERY_TIMEOUT_S = 30  # loopback delivery takes milliseconds; this only bounds a broken run


def settings_for(store, port: int, **extra) -> Settings:
    return Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=store, max_batch_wait_ms=1,
                    admin_keys=[ADMIN_KEY], client_keys=["client-key"], mqtt_host="127.0.0.1", mqtt_port=port,
                    **extra)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_backbone):
    """A store holding `widget` (memory adapter over four good shots), registered on a server without MQTT."""
    root = tmp_path_factory.mktemp("mqtt-store")
    settings = Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=root,
                        admin_keys=[ADMIN_KEY], client_keys=["client-key"])
    with threaded_server(settings, tiny_backbone) as url, Client(url, ADMIN_KEY) as admin:
        admin.register("widget", [good(s) for s in range(4)], finetune=False)
    return root


def predict(url: str, part: str, image=None, **headers) -> httpx.Response:
    r = httpx.post(f"{url}/v1/categories/widget/predict?heatmap=regions", headers={**CLIENT, **headers},
                   files=files((f"{part}.png", png(image or good(60)))), data={"part_id": part}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def test_each_verdict_is_published_with_the_answer_and_the_line_fields(store, tmp_path, tiny_backbone):
    with running_broker(tmp_path / "broker") as broker:
        subscriber = Subscriber(broker.port, "clipshot/#", client_id="fields")
        settings = settings_for(store, broker.port, mqtt_retain=True)
        with threaded_server(settings, tiny_backbone) as url:
            r = httpx.post(f"{url}/v1/categories/widget/predict?heatmap=regions",
                           headers={**CLIENT, "X-Clipshot-Line": "press/7", "X-Request-ID": "req-1"},
                           files=files(("a.png", png(good(61))), ("b.png", png(defect(62)))),
                           data={"part_id": "P-1", "camera": "top"}, timeout=60)
            assert r.status_code == 200, r.text
            assert _wait(lambda: len(subscriber.messages) >= 2)
        subscriber.close()
    answer = r.json()
    by_file = {m["filename"]: (m, t) for m, t in zip(subscriber.messages, subscriber.topics, strict=True)}
    for pred in answer["predictions"]:
        message, topic = by_file[pred["filename"]]
        assert topic == "clipshot/press_7/widget/result"  # the "/" in the line name cannot split the topic
        assert message["part_id"] == "P-1" and message["camera"] == "top" and message["line"] == "press/7"
        assert message["request_id"] == "req-1" and message["category"] == "widget"
        assert message["score"] == pred["score"] and message["sha256"] == pred["sha256"]
        assert message["verdict"] == ("anomalous" if pred["is_anomalous"] else "normal")
        assert message["normalised_score"] == pytest.approx(pred["score"] / pred["threshold"])
        assert message["confidence"] == pred["confidence"] and pred["confidence"]["good_images"] == 4
        assert message["regions"] == pred["regions"] and message["adapter_version"] == pred["adapter_version"]
    assert len({m["message_id"] for m in subscriber.messages}) == 2


def _wait(condition, timeout: float = DELIVERY_TIMEOUT_S) -> bool:
    return wait_until(condition, timeout)


def test_broker_crash_and_service_restart_lose_and_duplicate_nothing(store, tmp_path, tiny_backbone):
    """Broker hung, then SIGKILLed, the service restarted meanwhile, the broker SIGKILLed again mid-stream: every
    part arrives, each under exactly one message id, in the order it was inspected; every prediction answered 200
    (a message that was sent but not acknowledged is kept until it is)."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    subscriber = Subscriber(broker.port, "clipshot/#", client_id="fault")
    sent: list[str] = []
    try:
        settings = settings_for(store, broker.port)
        with threaded_server(settings, tiny_backbone) as url:
            for i in range(5):
                sent.append(f"a{i}"), predict(url, sent[-1])
            broker.freeze()  # hung: the connection looks up, but nothing is acknowledged
            for i in range(10):  # the line keeps inspecting; these are sent into the void
                sent.append(f"b{i}"), predict(url, sent[-1])
        # the service stopped while none of them was acknowledged: they wait on disk, not in a dead process
        with sqlite3.connect(store / OUTBOX_FILENAME) as db:
            assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] >= 10
        broker.kill()  # SIGKILL: the hung broker dies with whatever it had buffered
        broker.start()
        with threaded_server(settings, tiny_backbone) as url:
            stream_done = threading.Event()

            def stream() -> None:
                for i in range(30):
                    sent.append(f"c{i}"), predict(url, sent[-1])
                stream_done.set()

            poster = threading.Thread(target=stream)
            poster.start()
            assert _wait(lambda: sum(1 for m in subscriber.messages if m["part_id"].startswith("c")) >= 5)
            broker.kill()  # mid-stream, while requests and publishes are in flight
            time.sleep(0.5)
            broker.start()
            poster.join(timeout=120)
            assert stream_done.is_set()
            assert _wait(lambda: {m["part_id"] for m in subscriber.messages} >= set(sent)), (
                f"lost: {sorted(set(sent) - {m['part_id'] for m in subscriber.messages})}")
    finally:
        subscriber.close()
        broker.kill()
    ids_per_part: dict[str, set[str]] = {}
    for message in subscriber.messages:
        ids_per_part.setdefault(message["part_id"], set()).add(message["message_id"])
    assert len(sent) == 45 and set(ids_per_part) == set(sent)
    assert all(len(ids) == 1 for ids in ids_per_part.values()), "a result was published under two ids"
    first_seen = list(dict.fromkeys(m["part_id"] for m in subscriber.messages))
    assert first_seen == sent, "results arrived out of inspection order"
    # QoS 1 may deliver a message twice (PUBACK lost in the crash); de-duplicated by id, each part counts once
    assert len(subscriber.counts) == len(sent)


def test_a_full_outbox_drops_the_oldest_and_counts_them(tmp_path):
    from app.metrics import Metrics
    from app.serving.result_publisher import ResultPublisher

    with running_broker(tmp_path / "broker") as broker:
        metrics = Metrics()
        publisher = ResultPublisher(settings_for(tmp_path / "store", broker.port, mqtt_outbox_max=5), metrics)
        publisher.start()
        # persistent session, subscribed before the outage: whatever arrives after the restart is kept for it
        subscriber = Subscriber(broker.port, "clipshot/#", client_id="bounded")
        try:
            broker.stop()  # SIGTERM: the broker saves the subscriber's fresh session (a crash is the tests above)
            assert _wait(lambda: not publisher._connected.is_set())
            for i in range(8):  # three more than fit
                payload = json.dumps({"message_id": f"m{i}", "part_id": f"p{i}"}).encode()
                publisher.submit([(f"m{i}", "clipshot/l/widget/result", payload, False)])
            assert _wait(lambda: metrics.mqtt_outbox_dropped._value.get() == 3)
            assert metrics.mqtt_outbox_depth._value.get() == 5
            broker.start()
            assert subscriber.wait_for({f"m{i}" for i in range(3, 8)}, DELIVERY_TIMEOUT_S)
            time.sleep(0.3)  # anything dropped would have come with the rest
            assert set(subscriber.counts) == {f"m{i}" for i in range(3, 8)}  # the newest five, not the oldest
        finally:
            subscriber.close()
            publisher.stop()


TLS_FILE_CASES = {  # case -> (settings, the variable the error must name); certificates made by the test
    "missing_ca": (lambda f: {"mqtt_ca_file": f / "nope.pem"}, "CLIPSHOT_MQTT_CA_FILE"),
    "garbage_ca": (lambda f: {"mqtt_ca_file": f / "garbage.pem"}, "CLIPSHOT_MQTT_CA_FILE"),
    "missing_cert": (lambda f: {"mqtt_cert_file": f / "nope.pem", "mqtt_key_file": f / "a-key.pem"},
                     "CLIPSHOT_MQTT_CERT_FILE"),
    "garbage_cert": (lambda f: {"mqtt_cert_file": f / "garbage.pem", "mqtt_key_file": f / "a-key.pem"},
                     "CLIPSHOT_MQTT_CERT_FILE"),
    "key_of_another_cert": (lambda f: {"mqtt_cert_file": f / "a.pem", "mqtt_key_file": f / "b-key.pem"},
                            "CLIPSHOT_MQTT_KEY_FILE"),
}


@pytest.mark.parametrize("case", ["unreachable", "tls_to_plain", "unwritable_store", "bad_password",
                                  *TLS_FILE_CASES])
def test_bad_broker_configuration_is_one_line_naming_the_setting(case, tmp_path):
    port, named, extra, store = free_port(), "CLIPSHOT_MQTT_HOST", {}, tmp_path / "store"
    broker = None
    if case in TLS_FILE_CASES:
        from tests.helpers.certs import write_pair

        write_pair(tmp_path, "a", "a", "urn:a", server=False)
        write_pair(tmp_path, "b", "b", "urn:b", server=False)
        (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n")
        files, named = TLS_FILE_CASES[case]
        extra = {"mqtt_tls": True, **files(tmp_path)}
    elif case == "unwritable_store":
        store.write_text("a file where the store folder should be")
        named = "CLIPSHOT_STORE"
    if case in ("tls_to_plain", "bad_password"):
        config = ""
        if case == "bad_password":
            (tmp_path / "passwd").write_text("")
            subprocess.run(["mosquitto_passwd", "-b", str(tmp_path / "passwd"), "line", "right"], check=True)
            config = f"password_file {tmp_path / 'passwd'}\n"
        broker = Broker(tmp_path / "broker", config, anonymous=case != "bad_password")
        broker.start()
        port = broker.port
        extra, named = (({"mqtt_tls": True}, "CLIPSHOT_MQTT_TLS") if case == "tls_to_plain" else
                        ({"mqtt_username": "line", "mqtt_password": "wrong"}, "CLIPSHOT_MQTT_PASSWORD"))
    try:
        with pytest.raises(StartupError) as caught:
            start_mqtt(settings_for(store, port, mqtt_connect_timeout_s=3, **extra))
    finally:
        if broker is not None:
            broker.kill()
    message = str(caught.value)
    assert "\n" not in message and named in message, message
    if case in TLS_FILE_CASES:  # the one file that is wrong, not a list of suspects
        others = {"CLIPSHOT_MQTT_CA_FILE", "CLIPSHOT_MQTT_CERT_FILE", "CLIPSHOT_MQTT_KEY_FILE"} - {named}
        assert not any(other in message for other in others), message


def test_line_fields_are_checked_before_the_prediction(store, tiny_backbone):
    settings = Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=store,
                        admin_keys=[ADMIN_KEY], client_keys=["client-key"])
    with threaded_server(settings, tiny_backbone) as url:
        upload = files(("a.png", png(good(63))))
        bad = httpx.post(f"{url}/v1/categories/widget/predict", headers=CLIENT, files=upload,
                         data={"part_id": "P-1\nP-2"})
        clash = httpx.post(f"{url}/v1/categories/widget/predict", headers={**CLIENT, "X-Clipshot-Camera": "top"},
                           files=upload, data={"camera": "side"})
        fine = httpx.post(f"{url}/v1/categories/widget/predict", headers={**CLIENT, "X-Clipshot-Part-Id": "P-9"},
                          files=upload)  # no broker configured: predicting is unaffected
    for r in (bad, clash):
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text
    assert fine.status_code == 200


def test_bad_mqtt_settings_name_their_variable_and_hide_the_password():
    from pydantic import ValidationError

    from app.core.env import settings_error_line

    cases = [({"mqtt_topic": "clipshot/#"}, "CLIPSHOT_MQTT_TOPIC"),
             ({"mqtt_topic": "x/{plant}"}, "CLIPSHOT_MQTT_TOPIC"),
             ({"mqtt_ca_file": "/ca.pem"}, "CLIPSHOT_MQTT_TLS"),
             ({"mqtt_password": "s3cret-pw"}, "CLIPSHOT_MQTT_USERNAME"), ({"mqtt_port": 0}, "CLIPSHOT_MQTT_PORT")]
    for fields, named in cases:
        with pytest.raises(ValidationError) as caught:
            Settings(_env_file=None, insecure_dev=True, **fields)
        line = settings_error_line(caught.value)
        assert named in line and "s3cret-pw" not in line, line


def test_processes_sharing_a_store_each_claim_their_own_outbox(tmp_path):
    """Two senders on one outbox would race on its rows; a second replica on the same store gets the next file,
    and a freed outbox (its process died) is claimed, with its rows, by the next process to start."""
    from app.serving.outbox import Outbox

    first, second = Outbox.claim(tmp_path, 10), Outbox.claim(tmp_path, 10)
    assert first.path.name == OUTBOX_FILENAME and second.path.name == "mqtt-outbox-1.sqlite3"
    first.put([("m1", "t", b"left behind", False)])
    first.close()
    third = Outbox.claim(tmp_path, 10)
    assert third.path == first.path and [m.message_id for m in third.after(0, 10)] == ["m1"]
    second.close()
    third.close()


def test_a_service_killed_mid_stream_loses_no_answered_result(tmp_path):
    """`clipshot serve` SIGKILLed while predictions stream in and the broker hangs: every result a client got an
    answer for reaches the subscriber once the broker and a new service are back (the outbox is written before
    the answer, survives the kill, and its lock dies with the process so the new service takes it over)."""
    import os
    import signal

    from live_server import ADMIN, live_server
    from live_server import CLIENT as LIVE_CLIENT

    broker = Broker(tmp_path / "broker")
    broker.start()
    subscriber = Subscriber(broker.port, "clipshot/#", client_id="service-kill")
    env = {"CLIPSHOT_MQTT_HOST": "127.0.0.1", "CLIPSHOT_MQTT_PORT": str(broker.port)}
    answered: list[str] = []
    try:
        with live_server(tmp_path, **env) as server:
            with Client(server.base, ADMIN) as admin:
                admin.register("widget", [good(s) for s in range(4)], finetune=False)

            def stream() -> None:
                for i in range(200):
                    try:
                        r = httpx.post(f"{server.base}/v1/categories/widget/predict?heatmap=none",
                                       headers={"Authorization": f"Bearer {LIVE_CLIENT}"},
                                       files=files((f"k{i}.png", png(good(60)))), data={"part_id": f"k{i}"},
                                       timeout=30)
                    except httpx.TransportError:
                        return  # the service is gone: this one was never answered
                    if r.status_code == 200:
                        answered.append(f"k{i}")

            poster = threading.Thread(target=stream)
            poster.start()
            assert _wait(lambda: len(answered) >= 5)
            broker.freeze()  # from here nothing is acknowledged
            assert _wait(lambda: len(answered) >= 12)
            os.killpg(server.proc.pid, signal.SIGKILL)  # mid-stream: requests are in flight
            server.proc.wait(timeout=30)
            poster.join(timeout=60)
        broker.kill()
        broker.start()
        with live_server(tmp_path, **env):
            assert _wait(lambda: {m["part_id"] for m in subscriber.messages} >= set(answered)), (
                f"lost: {sorted(set(answered) - {m['part_id'] for m in subscriber.messages})}")
    finally:
        subscriber.close()
        broker.kill()
    ids = {}
    for message in subscriber.messages:
        ids.setdefault(message["part_id"], set()).add(message["message_id"])
    assert all(len(ids[part]) == 1 for part in answered), "a result was published under two ids"


def test_clipshot_serve_refuses_to_start_without_its_broker_in_one_line(tmp_path, monkeypatch, capsys):
    from app.cli.main import main

    for name, value in {"CLIPSHOT_MQTT_HOST": "127.0.0.1", "CLIPSHOT_MQTT_PORT": str(free_port()),
                        "CLIPSHOT_STORE": str(tmp_path), "CLIPSHOT_ADMIN_KEYS": ADMIN_KEY,
                        "CLIPSHOT_BACKBONE": "test:tiny-clip", "CLIPSHOT_DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no stray .env
    assert main(["serve"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipshot serve:")]
    assert len(lines) == 1 and "CLIPSHOT_MQTT_HOST" in lines[0], lines


def test_replicas_sharing_a_store_and_a_client_id_do_not_take_each_others_session(tmp_path):
    """Ray replicas on one store run one publisher each, with the same settings: with a fixed `mqtt_client_id`
    the broker would close the older connection on each (re)connect of the other, back and forth forever."""
    from app.serving.result_publisher import ResultPublisher

    with running_broker(tmp_path / "broker") as broker:
        settings = settings_for(tmp_path / "store", broker.port, mqtt_client_id="line-7")
        first, second = ResultPublisher(settings), ResultPublisher(settings)
        first.start()
        second.start()
        try:
            time.sleep(1.5)  # paho's first reconnect comes after 0.1 s (RECONNECT_DELAY_S): flapping shows by now
            assert first._connected.is_set() and second._connected.is_set()
        finally:
            first.stop()
            second.stop()
        log = (tmp_path / "broker" / "broker.log").read_text()
    assert "already connected" not in log, log  # Mosquitto's words when it takes a session over
    assert "as line-7 " in log and "as line-7-1 " in log, log
