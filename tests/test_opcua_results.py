"""The OPC UA server, driven by asyncua's own client against a real loopback service: over Basic256Sha256
SignAndEncrypt with a trusted client certificate and a user, browse, the ResultReady event, GetLatestResult and
InspectImage, values equal to the HTTP answer; no user, a bad password, an untrusted certificate and a None
channel refused; bad security files stop start-up in one line. Certificates are made in the test."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from threaded_server import free_port, threaded_server

from app.client import Client as ServiceClient
from app.core.config import Settings
from app.main import StartupError, _start_opcua, check_opcua
from app.serving.opcua_server import NAMESPACE
from tests.helpers.certs import ed25519_certificate, write_pair
from tests.helpers.predict import CLIENT, files, good, png

try:
    import asyncua  # noqa: F401
except ImportError:  # CI installs it (dev extra) and must run these; elsewhere they are skipped
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        raise
    pytest.skip("asyncua not installed (pip install -e '.[line]')", allow_module_level=True)
ADMIN_KEY = "admin-key"
EVENT_TIMEOUT_S = 20  # an event on loopback arrives within the 50 ms publishing interval; this bounds a broken run


CLIENT_URI = "urn:test:plc"


def make_pki(folder) -> dict:
    """Server certificate and key, a trusted client (its certificate in the trust folder) and an untrusted one."""
    server = write_pair(folder, "server", "clipshot", "urn:test:clipshot", server=True)
    trusted = write_pair(folder / "plc", "plc", "plc", CLIENT_URI, server=False)
    stranger = write_pair(folder / "stranger", "stranger", "plc", CLIENT_URI, server=False)
    (folder / "trusted").mkdir()
    (folder / "trusted" / "plc.pem").write_bytes(trusted[0].read_bytes())
    return {"server": server, "trusted": trusted, "stranger": stranger, "trust": folder / "trusted"}


def opcua_settings(store, port: int, image_root, pki: dict | None = None, **extra) -> Settings:
    security = ({"opcua_certificate": pki["server"][0], "opcua_private_key": pki["server"][1],
                 "opcua_trusted_clients": pki["trust"]} if pki else {"opcua_security_policies": "None"})
    return Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=store, admin_keys=[ADMIN_KEY],
                    client_keys=["client-key"], opcua_endpoint=f"opc.tcp://127.0.0.1:{port}/clipshot/",
                    **{"opcua_users": ["plc:secret"], **security, **extra}, opcua_image_root=image_root)


async def secure_client(endpoint: str, pair, user: str | None = "plc", password: str = "secret"):
    """asyncua's client on Basic256Sha256 SignAndEncrypt with the certificate ``pair`` (None: no security)."""
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    client = Client(endpoint, timeout=10)
    client.application_uri = CLIENT_URI
    if user:
        client.set_user(user)
        client.set_password(password)
    if pair is not None:
        await client.set_security(SecurityPolicyBasic256Sha256, str(pair[0]), str(pair[1]),
                                  mode=ua.MessageSecurityMode.SignAndEncrypt)
    return client


class Events:
    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def event_notification(self, event) -> None:
        self.queue.put_nowait(event)


async def _scenario(url: str, endpoint: str, images, pki: dict) -> dict:
    from asyncua import ua

    out: dict = {}
    client = await secure_client(endpoint, pki["trusted"])
    async with client:
        out["policy"] = client.security_policy.URI, client.security_policy.Mode
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
    out["refused"] = {}
    for name, pair, user, password in (("no user", pki["trusted"], None, ""),
                                       ("bad password", pki["trusted"], "plc", "wrong"),
                                       ("untrusted certificate", pki["stranger"], "plc", "secret")):
        stranger = await secure_client(endpoint, pair, user, password)
        with pytest.raises(ua.UaStatusCodeError) as refused:
            async with stranger:
                pass
        out["refused"][name] = refused.value.code
    out["refused"]["None channel"] = await _session_on_a_none_channel(endpoint)
    return out


async def _session_on_a_none_channel(endpoint: str) -> int:
    """What the server answers a client that skips the endpoint check and activates a session, with the right
    user, over an unsecured channel (asyncua keeps one open for discovery even when None is not offered)."""
    from asyncua import Client, ua

    client = Client(endpoint, timeout=10)
    client.application_uri = CLIENT_URI
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        params = ua.CreateSessionParameters(ClientDescription=ua.ApplicationDescription(
            ApplicationUri=CLIENT_URI, ApplicationType=ua.ApplicationType.Client), EndpointUrl=endpoint,
            SessionName="bypass", ClientNonce=b"n" * 32, RequestedSessionTimeout=60_000)
        session = await client.uaclient.create_session(params)
        token = ua.UserNameIdentityToken(UserName="plc", Password=b"secret", PolicyId="username")
        activate = ua.ActivateSessionParameters(UserIdentityToken=token, LocaleIds=["en"])
        assert session.ServerNonce
        with pytest.raises(ua.UaStatusCodeError) as refused:
            await client.uaclient.activate_session(activate)
        return refused.value.code
    finally:
        client.disconnect_socket()


def test_plc_reads_the_same_result_over_opc_ua(tmp_path, tiny_backbone):
    from asyncua import ua

    root = tmp_path / "camera"
    root.mkdir()
    (root / "part-7.png").write_bytes(png(good(91)))
    (tmp_path / "secret.png").write_bytes(png(good(92)))
    images = {"inside": root / "part-7.png", "outside": tmp_path / "secret.png", "missing": root / "nope.png"}
    port, pki = free_port(), make_pki(tmp_path / "pki")
    settings = opcua_settings(tmp_path / "store", port, root, pki)
    with threaded_server(settings, tiny_backbone) as url:
        with ServiceClient(url, ADMIN_KEY) as admin:
            admin.register("widget", [good(s) for s in range(4)], finetune=False)
            reference = admin.predict("widget", [images["inside"]], heatmap="none").predictions[0]
        out = asyncio.run(_scenario(url, settings.opcua_endpoint, images, pki))
        unsecured = asyncio.run(_connect_without_security(settings.opcua_endpoint))
    assert out["policy"] == ("http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256",
                             ua.MessageSecurityMode.SignAndEncrypt)
    assert out["refused"] == {"no user": ua.StatusCodes.BadIdentityTokenRejected,
                              "bad password": ua.StatusCodes.BadUserAccessDenied,
                              "untrusted certificate": ua.StatusCodes.BadCertificateUntrusted,
                              "None channel": ua.StatusCodes.BadUserAccessDenied}
    assert "No matching endpoints" in unsecured  # no None endpoint is offered at all
    pred = out["http"]["predictions"][0]
    record = out["event"]["record"]
    assert out["event"]["part"] == "P-1" and record["score"] == pred["score"] and record["sha256"] == pred["sha256"]
    assert record["regions"] == pred["regions"] and record["line"] == "L1"
    assert record["confidence"] == pred["confidence"] is not None
    assert out["event"]["verdict"] == ("anomalous" if pred["is_anomalous"] else "normal")
    assert out["nodes"] == {"Score": pred["score"], "Verdict": out["event"]["verdict"], "PartId": "P-1",
                            "Line": "L1", "IsAnomalous": pred["is_anomalous"], "Sha256": pred["sha256"]}
    assert out["latest"] == record
    inspected = out["inspected"]
    assert inspected["part_id"] == "P-7" and inspected["score"] == pytest.approx(reference.score)
    assert inspected["sha256"] == reference.sha256 and out["inspect_event"] == inspected
    assert out["outside"] == ua.StatusCodes.BadUserAccessDenied and out["missing"] == ua.StatusCodes.BadNotFound
    assert out["unknown"] == ua.StatusCodes.BadNotFound


async def _connect_without_security(endpoint: str) -> str:
    client = await secure_client(endpoint, None)
    try:
        async with client:
            return "connected"
    except Exception as exc:  # noqa: BLE001 (the refusal's text is what is checked)
        return str(exc)


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
    with pytest.raises(ValidationError) as caught:  # Basic256Sha256 is the default: it needs the files
        Settings(_env_file=None, insecure_dev=True, opcua_endpoint="opc.tcp://127.0.0.1:4840/", opcua_users="a:b")
    assert "CLIPSHOT_OPCUA_CERTIFICATE" in settings_error_line(caught.value)


@pytest.mark.parametrize("case", ["missing_certificate", "garbage_certificate", "key_of_another_certificate",
                                  "ed25519_certificate", "no_trust_folder", "broken_trusted_certificate",
                                  "bad_users_file"])
def test_bad_security_files_stop_start_up_in_one_line_naming_the_setting(case, tmp_path):
    pki = make_pki(tmp_path / "pki")
    extra, named = {}, {"missing_certificate": "CLIPSHOT_OPCUA_CERTIFICATE",
                        "garbage_certificate": "CLIPSHOT_OPCUA_CERTIFICATE",
                        "key_of_another_certificate": "CLIPSHOT_OPCUA_PRIVATE_KEY",
                        "ed25519_certificate": "CLIPSHOT_OPCUA_PRIVATE_KEY",
                        "no_trust_folder": "CLIPSHOT_OPCUA_TRUSTED_CLIENTS",
                        "broken_trusted_certificate": "CLIPSHOT_OPCUA_TRUSTED_CLIENTS",
                        "bad_users_file": "CLIPSHOT_OPCUA_USERS_FILE"}[case]
    if case == "missing_certificate":
        pki["server"][0].unlink()
    elif case == "garbage_certificate":
        pki["server"][0].write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    elif case == "key_of_another_certificate":
        extra["opcua_private_key"] = pki["stranger"][1]
    elif case == "ed25519_certificate":  # a key type without RSA's public numbers: still a mismatch, in one line
        pki["server"][0].write_bytes(ed25519_certificate("clipshot").public_bytes(serialization.Encoding.PEM))
    elif case == "no_trust_folder":
        extra["opcua_trusted_clients"] = tmp_path / "nowhere"
    elif case == "broken_trusted_certificate":
        (pki["trust"] / "line-2.der").write_bytes(b"\x30\x03garbage")
    else:
        (tmp_path / "users").write_text("plc:secret\n")  # a plain password where a hash belongs
        extra["opcua_users_file"] = tmp_path / "users"
    settings = opcua_settings(tmp_path / "store", free_port(), None, pki, **extra)
    with pytest.raises(StartupError) as caught:
        check_opcua(settings)
    message = str(caught.value)
    assert "\n" not in message and named in message, message
    with pytest.raises(StartupError) as caught:  # the server itself refuses the same way
        asyncio.run(_start_opcua(settings, None))
    assert named in str(caught.value)


def test_clipshot_serve_names_a_bad_opc_ua_key_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from app.cli.main import main

    pki = make_pki(tmp_path / "pki")
    for name, value in {"CLIPSHOT_OPCUA_ENDPOINT": f"opc.tcp://127.0.0.1:{free_port()}/",
                        "CLIPSHOT_OPCUA_USERS": "plc:secret", "CLIPSHOT_OPCUA_CERTIFICATE": str(pki["server"][0]),
                        "CLIPSHOT_OPCUA_PRIVATE_KEY": str(pki["trusted"][1]),
                        "CLIPSHOT_OPCUA_TRUSTED_CLIENTS": str(pki["trust"]), "CLIPSHOT_STORE": str(tmp_path),
                        "CLIPSHOT_ADMIN_KEYS": ADMIN_KEY, "CLIPSHOT_BACKBONE": "no-such-backbone:x"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no stray .env
    assert main(["serve"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipshot serve:")]
    # one line, and about the key: the (unloadable) backbone was never reached
    assert len(lines) == 1 and "CLIPSHOT_OPCUA_PRIVATE_KEY" in lines[0], lines


def test_users_file_takes_mosquitto_passwd_hashes(tmp_path):
    import shutil
    import subprocess

    from app.serving.opcua_security import hash_password, read_users_file, verify_password

    stored = hash_password("secret")
    assert verify_password(stored, "secret") and not verify_password(stored, "secreT")
    lines = [f"plc:{stored}"]
    if shutil.which("mosquitto_passwd"):  # the broker's own tool writes the same format
        made = tmp_path / "made"
        made.write_text("")
        for user, algorithm in (("mes7", "sha512-pbkdf2"), ("mes6", "sha512")):
            subprocess.run(["mosquitto_passwd", "-H", algorithm, "-b", str(made), user, "pw-" + user], check=True)
        lines += made.read_text().split()
    (tmp_path / "users").write_text("# line 1 users\n\n" + "\n".join(lines) + "\n")
    users = read_users_file(tmp_path / "users")
    assert verify_password(users["plc"], "secret")
    if len(lines) > 1:
        assert users["mes7"].startswith("$7$") and users["mes6"].startswith("$6$")
        assert verify_password(users["mes7"], "pw-mes7") and verify_password(users["mes6"], "pw-mes6")
        assert not verify_password(users["mes7"], "pw-mes6")
