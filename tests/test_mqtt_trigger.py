"""Inspections triggered over a real Mosquitto: N triggers give N results exactly once, each equal to the HTTP
answer for the same image; repeats are not inspected again; bad triggers (not JSON, a path outside the allowed
folder, through a symlink, an unknown product, not an image) get a published error result and the service goes
on. The service runs for real on loopback; a separate subscriber counts every delivery."""

from __future__ import annotations

import base64
import json
import time
from collections import Counter

import pytest
from mqtt_broker import Subscriber, running_broker
from threaded_server import threaded_server

from app.client import Client
from app.core.config import Settings
from app.main import StartupError, check_line_inputs
from app.serving.mqtt_trigger import RecentIds, subscription, topic_fields
from tests.helpers.predict import good, png
from tests.helpers.waiting import wait_until

ADMIN_KEY = "admin-key"
DELIVERY_TIMEOUT_S = 60  # a tiny-CLIP inspection takes well under a second; this only bounds a broken run
QUIET_S = 1.0  # after the last expected result: a duplicate inspection would have been published by then


def settings_for(store, port: int, root, **extra) -> Settings:
    return Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=store, max_batch_wait_ms=1,
                    admin_keys=[ADMIN_KEY], client_keys=["client-key"], mqtt_host="127.0.0.1", mqtt_port=port,
                    mqtt_trigger_topic="clipshot/{line}/{category}/trigger", mqtt_trigger_image_root=root, **extra)


def publisher(port: int):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plc")
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def test_n_triggers_give_n_results_exactly_once_and_bad_ones_an_error(tmp_path, tiny_backbone):
    root, store = tmp_path / "camera", tmp_path / "store"
    (root / "cam1").mkdir(parents=True)
    images = {f"p{i}": png(good(100 + i)) for i in range(8)}
    for name, data in images.items():
        (root / "cam1" / f"{name}.png").write_bytes(data)
    (tmp_path / "secret.png").write_bytes(png(good(99)))  # outside the allowed folder
    (root / "cam1" / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "cam1" / "notes.png").write_bytes(b"not an image")
    good_triggers = [  # 8 by relative path, 2 by absolute path, 2 as base64 bytes
        *[{"request_id": f"r{i}", "path": f"cam1/p{i}.png", "part_id": f"P-{i}"} for i in range(8)],
        {"request_id": "abs-0", "path": str(root / "cam1" / "p0.png")},
        {"request_id": "abs-1", "path": str(root / "cam1" / "p1.png"), "camera": "top"},
        {"request_id": "b64-2", "image": base64.b64encode(images["p2"]).decode(), "part_id": "P-2b"},
        {"request_id": "b64-3", "image": base64.b64encode(images["p3"]).decode()},
    ]
    bad_triggers = {  # request id -> (payload, the error code its result must carry)
        "dots": ({"request_id": "dots", "path": "cam1/../../secret.png"}, "path_not_allowed"),
        "outside": ({"request_id": "outside", "path": str(tmp_path / "secret.png")}, "path_not_allowed"),
        "symlink": ({"request_id": "symlink", "path": "cam1/link.png"}, "path_not_allowed"),
        "missing": ({"request_id": "missing", "path": "cam1/nope.png"}, "image_not_found"),
        "garbage": ({"request_id": "garbage", "path": "cam1/notes.png"}, "unsupported_image"),
        "both": ({"request_id": "both", "path": "cam1/p0.png", "image": "AAAA"}, "validation_error"),
        "not-b64": ({"request_id": "not-b64", "image": "***"}, "validation_error"),
        "typo": ({"request_id": "typo", "pth": "cam1/p0.png"}, "validation_error"),
    }
    with running_broker(tmp_path / "broker") as broker:
        subscriber = Subscriber(broker.port, "clipshot/+/+/result", client_id="results")
        settings = settings_for(store, broker.port, root)
        with threaded_server(settings, tiny_backbone) as url:
            with Client(url, ADMIN_KEY) as admin:
                admin.register("widget", [good(s) for s in range(4)], finetune=False)
                http = {name: admin.predict("widget", [root / "cam1" / f"{name}.png"], heatmap="regions")
                        .predictions[0] for name in images}
            plc = publisher(broker.port)
            for trigger in good_triggers:
                plc.publish("clipshot/L1/widget/trigger", json.dumps(trigger), qos=1).wait_for_publish(10)
            for trigger in good_triggers[:4]:  # a PLC re-sending (or QoS 1 re-delivering) the same triggers
                plc.publish("clipshot/L1/widget/trigger", json.dumps(trigger), qos=1).wait_for_publish(10)
            for payload, _ in bad_triggers.values():
                plc.publish("clipshot/L1/widget/trigger", json.dumps(payload), qos=1).wait_for_publish(10)
            plc.publish("clipshot/L1/widget/trigger", b"{not json", qos=1).wait_for_publish(10)
            plc.publish("clipshot/L1/gadget/trigger", json.dumps({"request_id": "nope", "path": "cam1/p0.png"}),
                        qos=1).wait_for_publish(10)
            expected = len(good_triggers) + len(bad_triggers) + 2
            assert wait_until(lambda: len(subscriber.messages) >= expected, DELIVERY_TIMEOUT_S), (
                len(subscriber.messages))
            time.sleep(QUIET_S)
            with Client(url, ADMIN_KEY) as admin:  # the service is still serving after all that
                assert admin.predict("widget", [root / "cam1" / "p0.png"]).predictions[0].sha256
            plc.loop_stop()
            plc.disconnect()
        subscriber.close()
    triggered = {t["request_id"] for t in good_triggers} | set(bad_triggers) | {None, "nope"}
    messages = [m for m in subscriber.messages if m["request_id"] in triggered]
    assert len(subscriber.messages) - len(messages) == len(images) + 1  # the HTTP predictions, published too
    assert len(messages) == expected  # nothing inspected twice, nothing lost
    per_request = Counter(m["request_id"] for m in messages)
    assert all(per_request[t["request_id"]] == 1 for t in good_triggers), per_request
    results = {m["request_id"]: m for m in messages if m["verdict"] != "error"}
    assert set(results) == {t["request_id"] for t in good_triggers}
    for trigger in good_triggers:
        name = trigger.get("path", "").rsplit("/", 1)[-1].removesuffix(".png") or trigger["request_id"].replace(
            "b64-", "p")
        record, reference = results[trigger["request_id"]], http[name]
        assert record["score"] == pytest.approx(reference.score) and record["sha256"] == reference.sha256
        assert record["regions"] == [r.model_dump() for r in reference.regions]
        assert record["line"] == "L1" and record["category"] == "widget"
    assert results["r3"]["part_id"] == "P-3" and results["abs-1"]["part_id"] == "p1"  # default: the file stem
    assert results["abs-1"]["camera"] == "top" and results["b64-2"]["part_id"] == "P-2b"
    errors = {m["request_id"]: m["error"]["code"] for m in messages if m["verdict"] == "error"}
    assert errors == {**{rid: code for rid, (_, code) in bad_triggers.items()}, None: "validation_error",
                      "nope": "category_not_found"}
    secret = [m for m in messages if m["request_id"] in ("outside", "symlink")]
    assert all("score" not in m for m in secret)  # the file outside the folder was never scored


def test_trigger_topics_and_the_bounded_memory_of_ids():
    settings = Settings(_env_file=None, insecure_dev=True, mqtt_host="h",
                        mqtt_trigger_topic="plant/{line}/{category}/{camera}/go")
    assert subscription(settings) == "$share/clipshot/plant/+/+/+/go"
    assert topic_fields(settings.mqtt_trigger_topic, "plant/L1/widget/top/go") == {
        "line": "L1", "category": "widget", "camera": "top"}
    seen = RecentIds(capacity=3)
    assert [seen.add(k) for k in "abcab"] == [True, True, True, False, False]
    assert seen.add("d") and len(seen) == 3 and seen.add("c")  # c was the oldest: forgotten, inspected again


def test_bad_trigger_settings_name_their_variable(tmp_path):
    from pydantic import ValidationError

    from app.core.env import settings_error_line

    for fields, named in (({"mqtt_trigger_topic": "a/{line}x/b"}, "CLIPSHOT_MQTT_TRIGGER_TOPIC"),
                          ({"mqtt_trigger_topic": "a/+/b"}, "CLIPSHOT_MQTT_TRIGGER_TOPIC"),
                          ({"mqtt_host": None, "mqtt_trigger_topic": "a/b"}, "CLIPSHOT_MQTT_HOST")):
        with pytest.raises(ValidationError) as caught:
            Settings(_env_file=None, insecure_dev=True, **{"mqtt_host": "h", **fields})
        assert named in settings_error_line(caught.value)
    settings = Settings(_env_file=None, insecure_dev=True, mqtt_host="h", mqtt_trigger_topic="a/b",
                        mqtt_trigger_image_root=tmp_path / "nowhere")
    with pytest.raises(StartupError) as caught:
        check_line_inputs(settings)
    assert "CLIPSHOT_MQTT_TRIGGER_IMAGE_ROOT" in str(caught.value) and "\n" not in str(caught.value)
