"""The OPC UA server, driven by asyncua's own client against a real loopback service: browse, the ResultReady
event, GetLatestResult and InspectImage, values equal to the HTTP answer; anonymous and bad users refused."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import httpx
import pytest
from threaded_server import free_port, threaded_server

from app.client import Client as ServiceClient
from app.core.config import Settings
from app.main import StartupError, _start_opcua
from app.serving.opcua_server import NAMESPACE
from tests.helpers.predict import CLIENT, files, good, png

try:
    import asyncua  # noqa: F401
except ImportError:  # CI installs it (dev extra) and must run these; elsewhere they are skipped
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        raise
    pytest.skip("asyncua not installed (pip install -e '.[line]')", allow_module_level=True)
ADMIN_KEY = "admin-key"
EVENT_TIMEOUT_S = 20  # an event on loopback arrives within the 50 ms publishing interval; this bounds a broken run


def opcua_settings(store, port: int, image_root) -> Settings:
    return Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=store, admin_keys=[ADMIN_KEY],
                    client_keys=["client-key"], opcua_endpoint=f"opc.tcp://127.0.0.1:{port}/clipshot/",
                    opcua_users=["plc:secret"], opcua_image_root=image_root)


class Events:
    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def event_notification(self, event) -> None:
        self.queue.put_nowait(event)


async def _scenario(url: str, endpoint: str, images) -> dict:
    from asyncua import Client, ua

    out: dict = {}
    client = Client(endpoint)
    client.set_user("plc")
    client.set_password("secret")
    async with client:
        ns = await client.get_namespace_index(NAMESPACE)
        root = await client.nodes.objects.get_child([f"{ns}:Clipshot"])
        events = Events()
        subscription = await client.create_subscription(50, events)
        event_type = await client.nodes.base_event_type.get_child([f"{ns}:ResultReadyEventType"])
        await subscription.subscribe_events(root, event_type)
        response = await asyncio.to_thread(
            httpx.post, f"{url}/v1/categories/widget/predict?heatmap=regions", headers=CLIENT,
            files=files(("a.png", png(good(90)))), data={"part_id": "P-1", "line": "L1"}, timeout=60)
        out["http"] = response.json()
        event = await asyncio.wait_for(events.queue.get(), EVENT_TIMEOUT_S)
        out["event"] = {"part": event.PartId, "verdict": event.Verdict, "record": json.loads(event.ResultJson)}
        product = await root.get_child([f"{ns}:widget"])
        out["nodes"] = {name: await (await product.get_child([f"{ns}:{name}"])).read_value()
                        for name in ("Score", "Verdict", "PartId", "Line", "IsAnomalous", "Sha256")}
        out["latest"] = json.loads(await root.call_method(f"{ns}:GetLatestResult", "widget"))
        out["inspected"] = json.loads(await root.call_method(f"{ns}:InspectImage", "widget", str(images["inside"]),
                                                             "P-7"))
        event = await asyncio.wait_for(events.queue.get(), EVENT_TIMEOUT_S)
        out["inspect_event"] = json.loads(event.ResultJson)
        for name, path in (("outside", images["outside"]), ("missing", images["missing"])):
            with pytest.raises(ua.UaStatusCodeError) as refused:
                await root.call_method(f"{ns}:InspectImage", "widget", str(path), "")
            out[name] = refused.value.code
        with pytest.raises(ua.UaStatusCodeError) as unknown:
            await root.call_method(f"{ns}:GetLatestResult", "nope")
        out["unknown"] = unknown.value.code
    for user, password in ((None, None), ("plc", "wrong")):
        stranger = Client(endpoint)
        if user:
            stranger.set_user(user)
            stranger.set_password(password)
        with pytest.raises(Exception):  # noqa: B017 (asyncua raises a status-code error per refusal kind)
            async with stranger:
                pass
    return out


def test_plc_reads_the_same_result_over_opc_ua(tmp_path, tiny_backbone):
    from asyncua import ua

    root = tmp_path / "camera"
    root.mkdir()
    (root / "part-7.png").write_bytes(png(good(91)))
    (tmp_path / "secret.png").write_bytes(png(good(92)))
    images = {"inside": root / "part-7.png", "outside": tmp_path / "secret.png", "missing": root / "nope.png"}
    port = free_port()
    settings = opcua_settings(tmp_path / "store", port, root)
    with threaded_server(settings, tiny_backbone) as url:
        with ServiceClient(url, ADMIN_KEY) as admin:
            admin.register("widget", [good(s) for s in range(4)], finetune=False)
            reference = admin.predict("widget", [images["inside"]], heatmap="none").predictions[0]
        out = asyncio.run(_scenario(url, settings.opcua_endpoint, images))
    pred = out["http"]["predictions"][0]
    record = out["event"]["record"]
    assert out["event"]["part"] == "P-1" and record["score"] == pred["score"] and record["sha256"] == pred["sha256"]
    assert record["regions"] == pred["regions"] and record["line"] == "L1"
    assert out["event"]["verdict"] == ("anomalous" if pred["is_anomalous"] else "normal")
    assert out["nodes"] == {"Score": pred["score"], "Verdict": out["event"]["verdict"], "PartId": "P-1",
                            "Line": "L1", "IsAnomalous": pred["is_anomalous"], "Sha256": pred["sha256"]}
    assert out["latest"] == record
    inspected = out["inspected"]
    assert inspected["part_id"] == "P-7" and inspected["score"] == pytest.approx(reference.score)
    assert inspected["sha256"] == reference.sha256 and out["inspect_event"] == inspected
    assert out["outside"] == ua.StatusCodes.BadUserAccessDenied and out["missing"] == ua.StatusCodes.BadNotFound
    assert out["unknown"] == ua.StatusCodes.BadNotFound


def test_a_taken_port_is_one_line_naming_the_endpoint(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = opcua_settings(tmp_path, taken.getsockname()[1], None)
        with pytest.raises(StartupError) as caught:
            asyncio.run(_start_opcua(settings, None))
    assert "CLIPSHOT_OPCUA_ENDPOINT" in str(caught.value) and "\n" not in str(caught.value)


def test_an_endpoint_without_users_needs_anonymous_said_out_loud():
    from pydantic import ValidationError

    from app.core.env import settings_error_line

    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, insecure_dev=True, opcua_endpoint="opc.tcp://127.0.0.1:4840/")
    assert "CLIPSHOT_OPCUA_USERS" in settings_error_line(caught.value)
