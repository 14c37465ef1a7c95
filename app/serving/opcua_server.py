"""Results for PLCs over OPC UA (asyncua), in the spirit of OPC 40100 Machine Vision's result management.

Under ``Objects/Clipshot``: one object per product (made when its first result arrives) whose variables hold the
last result's fields (``Verdict``, ``IsAnomalous``, ``Score``, ``NormalisedScore``, ``Threshold``, ``PartId``,
``Line``, ``Camera``, ``Sha256``, ``AdapterVersion``, ``Time``, ``MessageId``, ``ResultJson``); a
``ResultReadyEventType`` event per result, emitted by ``Clipshot``; and two methods on ``Clipshot``:
``GetLatestResult(category) -> json`` and ``InspectImage(category, path, part_id) -> json``, which scores an image
the PLC's camera saved under ``opcua_image_root`` and hands the result to every line output like an HTTP
prediction. It runs on the service's event loop, so updating nodes needs no locks; ``accept`` is called there
by the predict routes and only schedules the update.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from app.core.config import Settings, env_var
from app.serving.opcua_security import OpcUaConfigError, OpcUaSecurity, load_security

log = logging.getLogger(__name__)
NAMESPACE = "urn:clipshot:results"
# (browse name, record field, OPC UA type name)
FIELDS = (("Verdict", "verdict", "String"), ("IsAnomalous", "is_anomalous", "Boolean"), ("Score", "score", "Double"),
          ("NormalisedScore", "normalised_score", "Double"), ("Threshold", "threshold", "Double"),
          ("PartId", "part_id", "String"), ("Line", "line", "String"), ("Camera", "camera", "String"),
          ("Sha256", "sha256", "String"), ("AdapterVersion", "adapter_version", "Int64"),
          ("Time", "time", "String"), ("MessageId", "message_id", "String"))
EVENT_FIELDS = ("Category", "PartId", "Verdict", "ResultJson")
# A variable keeps one type; a missing value (no threshold, no part id) is shown as this. `Verdict` says `unknown`
# when there is no threshold, so IsAnomalous=false there means nothing; `ResultJson` has the nulls.
EMPTY = {"String": "", "Boolean": False, "Double": float("nan"), "Int64": -1}
STATUS = {"path_not_allowed": "BadUserAccessDenied", "image_not_found": "BadNotFound"}  # else BadInvalidArgument
POLICY_TYPES = {  # setting value -> asyncua's policy type (given the imported ``ua`` module)
    "None": lambda ua: ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": lambda ua: ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": lambda ua: ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}


class OpcUaResults:
    """The OPC UA server; ``start``/``stop`` on the service's loop, ``accept(records)`` per prediction."""

    def __init__(self, settings: Settings, state: Any) -> None:
        self.settings, self.state = settings, state
        self._server: Any = None
        self._products: dict[str, dict[str, Any]] = {}  # category -> {"node", "vars"}
        self._latest: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        try:
            from asyncua import Server, ua
        except ImportError as exc:
            raise OpcUaConfigError(f"{env_var('opcua_endpoint')} is set but asyncua is not installed: "
                                   "pip install 'clipshot[line]'") from exc
        s = self.settings
        if s.opcua_endpoint is None:
            raise OpcUaConfigError(f"{env_var('opcua_endpoint')} is not set: no endpoint to serve")
        security = await asyncio.to_thread(load_security, s)
        server = Server(user_manager=_users(security, s.opcua_allow_anonymous,
                                            secure_only="None" not in s.opcua_security_policies))
        await server.init()
        server.set_endpoint(s.opcua_endpoint)
        server.set_server_name("clipshot")
        await _secure(server, security, s.opcua_security_policies)
        tokens: list[type] = [ua.UserNameIdentityToken] + ([ua.AnonymousIdentityToken] if s.opcua_allow_anonymous
                                                           else [])
        server.set_identity_tokens(tokens)
        idx = await server.register_namespace(NAMESPACE)
        self._idx, self._ua = idx, ua
        self._root = await server.nodes.objects.add_object(idx, "Clipshot")
        event_type = await server.create_custom_event_type(
            idx, "ResultReadyEventType", ua.ObjectIds.BaseEventType,
            [(name, ua.VariantType.String) for name in EVENT_FIELDS])
        self._events = await server.get_event_generator(event_type, self._root.nodeid)
        await self._root.add_method(idx, "GetLatestResult", self._get_latest, [ua.VariantType.String],
                                    [ua.VariantType.String])
        await self._root.add_method(idx, "InspectImage", self._inspect_image,
                                    [ua.VariantType.String, ua.VariantType.String, ua.VariantType.String],
                                    [ua.VariantType.String])
        try:
            await server.start()
        except OSError as exc:
            raise OpcUaConfigError(f"cannot serve OPC UA at {s.opcua_endpoint} ({exc}); check "
                                   f"{env_var('opcua_endpoint')}") from exc
        self._server = server
        log.info("OPC UA server at %s (security: %s)", s.opcua_endpoint, ", ".join(s.opcua_security_policies))

    async def stop(self) -> None:
        for task in list(self._tasks):
            await task
        if self._server is not None:
            await self._server.stop()
            self._server = None

    # -- results in ------------------------------------------------------------------------------
    async def accept(self, records: list[dict[str, Any]]) -> None:
        """Called on the event loop after a prediction: schedule the node update and the events, in order."""
        task = asyncio.get_running_loop().create_task(self._update(records))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _update(self, records: list[dict[str, Any]]) -> None:
        ua = self._ua
        try:
            for record in records:
                product = await self._product(record["category"])
                for name, key, kind in FIELDS:
                    value = record.get(key)
                    await product[name].write_value(ua.Variant(EMPTY[kind] if value is None else value,
                                                               getattr(ua.VariantType, kind)))
                text = json.dumps(record, separators=(",", ":"))
                await product["ResultJson"].write_value(ua.Variant(text, ua.VariantType.String))
                self._latest[record["category"]] = record
                event = self._events.event
                event.Category, event.PartId = record["category"], record["part_id"] or ""
                event.Verdict, event.ResultJson = record["verdict"], text
                await self._events.trigger(message=f"{record['category']}: {record['verdict']}")
        except Exception:  # an OPC UA hiccup must not surface in the predict request
            log.exception("could not update the OPC UA result nodes")

    async def _product(self, category: str) -> dict[str, Any]:
        if category not in self._products:
            ua = self._ua
            node = await self._root.add_object(self._idx, category)
            nodes = {name: await node.add_variable(self._idx, name, ua.Variant(EMPTY[kind], getattr(ua.VariantType,
                                                                                                   kind)))
                     for name, _, kind in FIELDS}
            nodes["ResultJson"] = await node.add_variable(self._idx, "ResultJson", "", ua.VariantType.String)
            self._products[category] = nodes
        return self._products[category]

    # -- methods -------------------------------------------------------------------------------
    async def _get_latest(self, parent: Any, category: Any) -> Any:
        ua = self._ua
        record = self._latest.get(category.Value)
        if record is None:
            return ua.StatusCode(ua.StatusCodes.BadNotFound)
        return [ua.Variant(json.dumps(record), ua.VariantType.String)]

    async def _inspect_image(self, parent: Any, category: Any, path: Any, part_id: Any) -> Any:
        from app.serving.line_inspect import InspectError, inspect_image, read_confined
        from app.serving.result_publisher import LineContext

        ua = self._ua
        try:
            data, name = await read_confined(self.settings.opcua_image_root, path.Value or "",
                                             env_var("opcua_image_root"), self.settings.max_upload_bytes)
            records = await inspect_image(self.state, category.Value, data, name,
                                          LineContext(part_id=part_id.Value or Path(name).stem), None)
        except InspectError as exc:
            log.warning("InspectImage %s: %s", path.Value, exc.message)
            return ua.StatusCode(getattr(ua.StatusCodes, STATUS.get(exc.code, "BadInvalidArgument")))
        return [ua.Variant(json.dumps(records[0]) if records else "", ua.VariantType.String)]


def _users(security: OpcUaSecurity, allow_anonymous: bool, secure_only: bool) -> Any:
    """asyncua's user manager over the loaded users: a session needs a known user and its password.

    ``secure_only``: a session must come over a signed channel. asyncua keeps a None channel open for endpoint
    discovery even when no None endpoint is offered, and would activate a session on it; such a channel has
    no peer certificate, and that is what refuses it here.
    """
    from asyncua.crypto.permission_rules import User, UserRole
    from asyncua.server.user_managers import UserManager

    class Users(UserManager):
        def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                     certificate: Any = None) -> Any:
            if secure_only and not certificate:  # None, or b"" (a None channel has no peer certificate)
                return None
            if username is None:
                return User(role=UserRole.User) if allow_anonymous else None
            return User(role=UserRole.User) if security.check_password(username, password) else None

    return Users()


async def _secure(server: Any, security: OpcUaSecurity, policies: list[str]) -> None:
    """Offer exactly ``policies``; with Basic256Sha256, the server's certificate and a trust list for clients."""
    from asyncua import ua
    from asyncua.crypto.truststore import TrustStore
    from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

    server.set_security_policy([POLICY_TYPES[policy](ua) for policy in policies])
    if security.certificate_der is None:
        return
    if security.trusted_clients is None:  # load_security sets it with the certificate
        raise OpcUaConfigError("an OPC UA certificate without a folder of trusted client certificates")
    await server.load_certificate(security.certificate_der)
    await server.load_private_key(security.private_key_der)
    if security.application_uri:  # clients check that the certificate names the server they talk to
        await server.set_application_uri(security.application_uri)
    store = TrustStore([security.trusted_clients], [])
    await store.load()
    # The trust list decides; key-usage bits vary between client tools, so they are not second-guessed here.
    options = (CertificateValidatorOptions.TIME_RANGE | CertificateValidatorOptions.URI
               | CertificateValidatorOptions.TRUSTED | CertificateValidatorOptions.PEER_CLIENT)
    server.set_certificate_validator(CertificateValidator(options, store))


async def start_opcua(settings: Settings, state: Any) -> OpcUaResults:
    """The running OPC UA server for the app's ``state`` (its inference and line outputs)."""
    server = OpcUaResults(settings, state)
    await server.start()
    return server
