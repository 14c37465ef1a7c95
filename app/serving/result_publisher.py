"""Every verdict to the line's MQTT broker (QoS 1), through an on-disk outbox so a broker outage loses nothing.

Why an outbox written before the answer, and a sender thread: a prediction must never wait for, or fail because
of, the broker, yet a result its client has seen must not be lost if the service dies right after. So the
request path writes the results to the outbox (``app.serving.outbox``; a SQLite insert in a worker thread,
durable across a process crash) and answers; the sender thread publishes the oldest messages while connected,
keeps at most ``WINDOW`` unacknowledged, and deletes each one when its PUBACK arrives. paho re-sends
unacknowledged QoS 1 messages in their original order after a reconnect, and the thread feeds no new ones while
disconnected, so the broker sees the results in the order they were made. Each message has a fresh
``message_id`` (a UUID): a message re-sent after a lost PUBACK or a crash arrives twice with the same id, and
consumers drop the repeat.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.core.config import Settings, env_var
from app.metrics import Metrics
from app.schemas.prediction import PredictResponse
from app.serving.outbox import Outbox, OutboxError

log = logging.getLogger(__name__)
QOS = 1  # at least once: with the outbox and message ids, nothing is lost and repeats are recognisable
WINDOW = 64  # messages handed to paho and not yet acknowledged; more only adds memory, not throughput
RECONNECT_DELAY_S = (0.1, 5.0)  # paho's backoff: first retry fast (a broker restart), then at most every 5 s
_TOPIC_UNSAFE = re.compile(r"[/+#\x00-\x1f]")  # would split the level or act as a wildcard


class PublisherConfigError(RuntimeError):
    """The broker settings do not work: the message is one line that names the setting to change."""


@dataclass(frozen=True)
class LineContext:
    """Where an image came from on the line, as the client said (each may be missing)."""

    part_id: str | None = None
    line: str | None = None
    camera: str | None = None


def _level(value: str) -> str:
    """A value made safe as one topic level (no separators or wildcards)."""
    return _TOPIC_UNSAFE.sub("_", value) or "_"


def result_records(settings: Settings, answer: PredictResponse, context: LineContext,
                   request_id: str | None) -> list[dict[str, Any]]:
    """One result per image of the answer, in upload order: what every line output (MQTT, OPC UA) carries."""
    line = context.line or settings.mqtt_line
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    records = []
    for index, pred in enumerate(answer.predictions):
        verdict = "unknown" if pred.is_anomalous is None else "anomalous" if pred.is_anomalous else "normal"
        records.append({
            "message_id": str(uuid.uuid4()), "request_id": request_id, "index": index, "time": now,
            "category": pred.category, "part_id": context.part_id, "line": line, "camera": context.camera,
            "filename": pred.filename, "sha256": pred.sha256, "verdict": verdict, "is_anomalous": pred.is_anomalous,
            "score": pred.score, "threshold": pred.threshold,
            "normalised_score": pred.score / pred.threshold if pred.threshold else None,
            "confidence": None if pred.confidence is None else pred.confidence.model_dump(),
            "adapter_version": pred.adapter_version, "adapter_source": answer.adapter_source,
            "regions": None if pred.regions is None else [r.model_dump() for r in pred.regions],
            "replica": answer.replica,
        })
    return records


def record_messages(settings: Settings, records: list[dict[str, Any]]) -> list[tuple[str, str, bytes, bool]]:
    """``(message_id, topic, payload, retain)`` for each result."""
    return [(r["message_id"],
             settings.mqtt_topic.format(line=_level(r["line"]), category=_level(r["category"]),
                                        camera=_level(r["camera"] or "_")),
             json.dumps(r, separators=(",", ":")).encode(), settings.mqtt_retain) for r in records]


def result_messages(settings: Settings, answer: PredictResponse, context: LineContext,
                    request_id: str | None) -> list[tuple[str, str, bytes, bool]]:
    """One ``(message_id, topic, payload, retain)`` per image of the answer, in upload order."""
    return record_messages(settings, result_records(settings, answer, context, request_id))


async def deliver(state: Any, answer: PredictResponse, context: LineContext,
                  request_id: str | None) -> list[dict[str, Any]]:
    """Hand the answer's results to every line output (``state.result_sinks``: MQTT outbox, OPC UA); returns
    them as handed over (empty if that failed, which is logged and never raised: the answer stands)."""
    try:
        records = result_records(state.settings, answer, context, request_id)
        for sink in getattr(state, "result_sinks", None) or ():
            await sink.accept(records)
    except Exception:  # the answer is made: a publishing bug must not turn it into a 500
        log.exception("could not hand the results to the line outputs")
        return []
    return records


def _check_tls_files(s: Settings) -> None:
    """Load each TLS file the way paho will, one at a time, so the error names the one that is wrong."""
    context = ssl.create_default_context()
    for name, path in (("mqtt_ca_file", s.mqtt_ca_file), ("mqtt_cert_file", s.mqtt_cert_file),
                       ("mqtt_key_file", s.mqtt_key_file)):
        if path is not None and not os.access(path, os.R_OK):
            raise PublisherConfigError(f"cannot read {path}; check {env_var(name)}")
    try:
        if s.mqtt_ca_file is not None:
            context.load_verify_locations(cafile=str(s.mqtt_ca_file))
    except (ssl.SSLError, ValueError) as exc:
        raise PublisherConfigError(f"{s.mqtt_ca_file} holds no usable CA certificate ({exc}); check "
                                   f"{env_var('mqtt_ca_file')}") from exc
    if s.mqtt_cert_file is None or s.mqtt_key_file is None:
        return
    if not _is_pem_certificate(s.mqtt_cert_file):
        raise PublisherConfigError(f"{s.mqtt_cert_file} is not a PEM certificate; check {env_var('mqtt_cert_file')}")
    try:
        context.load_cert_chain(str(s.mqtt_cert_file), str(s.mqtt_key_file))
    except ssl.SSLError as exc:  # the certificate loaded above, so it is the key: unreadable, or another's
        raise PublisherConfigError(f"{s.mqtt_key_file} is not the private key of {s.mqtt_cert_file} ({exc}); "
                                   f"check {env_var('mqtt_key_file')}") from exc


def _is_pem_certificate(path: Path) -> bool:
    try:
        from cryptography import x509
    except ImportError:  # without it (no `line` extra), the pair check below names the key for both
        return True
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        return False
    return True


class ResultPublisher:
    """Owns the outbox, one paho client and the sender thread; ``start`` fails fast on bad settings."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, outbox_dir: Path | None = None,
                 outbox_fix: str | None = None) -> None:
        """``outbox_dir`` defaults to the store; ``outbox_fix`` says what to change when it is not writable."""
        try:
            import paho.mqtt.client  # noqa: F401 (checked here: the extra may be missing)
        except ImportError as exc:
            raise PublisherConfigError(f"{env_var('mqtt_host')} is set but paho-mqtt is not installed: "
                                       "pip install 'clipshot[line]'") from exc
        self.settings = settings
        self.metrics = metrics
        self.outbox_dir = outbox_dir or settings.store
        self.outbox_fix = outbox_fix or f"make {env_var('store')} a writable directory"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self._thread: threading.Thread | None = None
        self._outbox: Outbox | None = None
        self._client: Any = None  # made by ``start``, once the outbox (and so the client id) is known
        self._subscriptions: list[tuple[str, Callable[[str, bytes], None]]] = []
        self._subacks: dict[int, list[Any]] = {}
        self._suback = threading.Condition()

    # -- life cycle -------------------------------------------------------------------------------
    def start(self, send: bool = True) -> None:
        """Open the outbox, connect (or raise ``PublisherConfigError``), then start sending (``send=False``: only
        check that the settings work, as ``clipshot serve`` does before loading the model)."""
        s = self.settings
        try:
            self._outbox = Outbox.claim(self.outbox_dir, s.mqtt_outbox_max)
        except OutboxError as exc:
            raise PublisherConfigError(f"{exc}; {self.outbox_fix}") from exc
        self._client = self._new_client(self._outbox.slot)
        try:
            self._configure_client()
            self._client.connect(s.mqtt_host or "", s.mqtt_port, keepalive=30)
        except ssl.SSLError as exc:
            self._outbox.close()
            raise PublisherConfigError(f"TLS to the MQTT broker {s.mqtt_host}:{s.mqtt_port} failed ({exc}); check "
                                       f"{env_var('mqtt_ca_file')} and {env_var('mqtt_tls')}") from exc
        except OSError as exc:
            self._outbox.close()
            tls = f", and {env_var('mqtt_tls')} (is that port a TLS listener?)" if s.mqtt_tls else ""
            raise PublisherConfigError(f"cannot reach the MQTT broker at {s.mqtt_host}:{s.mqtt_port} ({exc}); "
                                       f"check {env_var('mqtt_host')} and {env_var('mqtt_port')}{tls}") from exc
        self._client.loop_start()
        deadline = time.monotonic() + s.mqtt_connect_timeout_s
        while not self._connected.wait(0.05):
            if self._connect_error or time.monotonic() > deadline:
                self._client.loop_stop()
                self._outbox.close()
                where = f"the MQTT broker at {s.mqtt_host}:{s.mqtt_port}"
                if self._connect_error:
                    raise PublisherConfigError(f"{where} refused the connection ({self._connect_error}); check "
                                               f"{env_var('mqtt_username')} and {env_var('mqtt_password')}")
                raise PublisherConfigError(f"{where} did not answer within {s.mqtt_connect_timeout_s} s; check "
                                           f"{env_var('mqtt_host')} and {env_var('mqtt_port')}")
        if send:
            self._thread = threading.Thread(target=self._run, name="mqtt-sender", daemon=True)
            self._thread.start()

    def client_id(self, slot: int) -> str:
        """``mqtt_client_id`` (``-<slot>`` added past the first outbox: replicas sharing a store and that setting
        would otherwise take each other's session over, endlessly), else ``clipshot-<host name>-<pid>``."""
        configured = self.settings.mqtt_client_id
        if configured:
            return configured if slot == 0 else f"{configured}-{slot}"
        return f"clipshot-{socket.gethostname()}-{os.getpid()}"

    def _new_client(self, slot: int) -> Any:
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id(slot),
                             protocol=mqtt.MQTTv311, clean_session=True)
        # paho annotates whole seconds, but only compares, doubles and sleeps the delays: 0.1 s works
        client.reconnect_delay_set(*RECONNECT_DELAY_S)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = lambda *_: self._wake.set()
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _configure_client(self) -> None:
        s = self.settings
        if s.mqtt_username:
            self._client.username_pw_set(s.mqtt_username, s.mqtt_password)
        if s.mqtt_tls:
            _check_tls_files(s)
            try:
                self._client.tls_set(ca_certs=str(s.mqtt_ca_file) if s.mqtt_ca_file else None,
                                     certfile=str(s.mqtt_cert_file) if s.mqtt_cert_file else None,
                                     keyfile=str(s.mqtt_key_file) if s.mqtt_key_file else None)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise PublisherConfigError(f"cannot load the MQTT TLS files ({exc}); check {env_var('mqtt_ca_file')}"
                                           f", {env_var('mqtt_cert_file')} and {env_var('mqtt_key_file')}") from exc

    def stop(self, drain_s: float = 2.0) -> None:
        """Give in-flight messages ``drain_s`` to be acknowledged, then disconnect; the rest wait in the outbox."""
        if self._thread is not None:
            deadline = time.monotonic() + drain_s
            while self.pending() and self._connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.02)
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout=10)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None

    # -- the request side ------------------------------------------------------------------------
    def submit(self, messages: list[tuple[str, str, bytes, bool]]) -> None:
        """Store messages in the outbox (oldest dropped beyond its bound, counted) and wake the sender."""
        if not messages:
            return
        assert self._outbox is not None, "start() the publisher first"
        dropped = self._outbox.put(messages)
        if dropped:
            log.warning("MQTT outbox full (%d messages): dropped the %d oldest", self._outbox.max_messages, dropped)
        if self.metrics is not None:
            self.metrics.mqtt_outbox_dropped.inc(dropped)
            self.metrics.mqtt_outbox_depth.set(self._outbox.depth())
        self._wake.set()

    async def accept(self, records: list[dict[str, Any]]) -> None:
        """A line output's entry point (``deliver``): the results are in the outbox when this returns."""
        await asyncio.to_thread(self.submit, record_messages(self.settings, records))

    def pending(self) -> int:
        """Messages not yet acknowledged by the broker."""
        return self._outbox.depth() if self._outbox is not None else 0

    # -- inbound (trigger topic) -----------------------------------------------------------------
    def subscribe(self, topic_filter: str, callback: Callable[[str, bytes], None], timeout_s: float) -> None:
        """Subscribe (QoS 1) on the publisher's connection, now and after every reconnect (clean sessions);
        ``callback(topic, payload)`` runs on paho's network thread. Raises ``PublisherConfigError`` when the
        broker refuses the subscription (its ACL) or does not answer within ``timeout_s``."""
        self._subscriptions.append((topic_filter, callback))
        _, mid = self._client.subscribe(topic_filter, qos=QOS)
        with self._suback:
            self._suback.wait_for(lambda: mid in self._subacks, timeout_s)
            codes = self._subacks.pop(mid, None)
        if codes is None or any(code.is_failure for code in codes):
            answer = "did not answer" if codes is None else f"refused it ({', '.join(map(str, codes))})"
            raise PublisherConfigError(f"subscribing to {topic_filter}: the MQTT broker {answer}; check "
                                       f"{env_var('mqtt_trigger_topic')} and the broker's ACL for "
                                       f"{env_var('mqtt_username')}")

    def unsubscribe(self) -> None:
        """Stop taking messages (before ``stop``: nothing new arrives while the service drains)."""
        for topic_filter, _ in self._subscriptions:
            self._client.unsubscribe(topic_filter)
        self._subscriptions = []

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: list[Any], properties: Any) -> None:
        with self._suback:
            self._subacks[mid] = codes
            self._suback.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        import paho.mqtt.client as mqtt

        for topic_filter, callback in self._subscriptions:
            plain = topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
            if mqtt.topic_matches_sub(plain, message.topic):
                try:
                    callback(message.topic, message.payload)
                except Exception:  # paho's network thread must survive a handler's bug
                    log.exception("MQTT message handler failed on %s", message.topic)

    # -- the sender thread -----------------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            return
        for topic_filter, _ in self._subscriptions:  # a clean session forgets them on every reconnect
            client.subscribe(topic_filter, qos=QOS)
        if not self._connected.is_set():
            log.info("connected to the MQTT broker %s:%d", self.settings.mqtt_host, self.settings.mqtt_port)
        self._connected.set()
        self._wake.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self._connected.is_set() and not self._stop.is_set():
            log.warning("lost the MQTT broker %s:%d (%s); results wait in the outbox", self.settings.mqtt_host,
                        self.settings.mqtt_port, reason_code)
        self._connected.clear()

    def _run(self) -> None:
        inflight: dict[int, Any] = {}  # seq -> paho MQTTMessageInfo, in publish order
        last_seq = 0
        while True:
            self._wake.wait(0.25)
            self._wake.clear()
            try:
                done = [seq for seq, info in inflight.items() if info.is_published()]
                for seq in done:
                    del inflight[seq]
                assert self._outbox is not None
                self._outbox.remove(done)
                if done and self.metrics is not None:
                    self.metrics.mqtt_published.inc(len(done))
                if self._stop.is_set():
                    return
                if self._connected.is_set() and len(inflight) < WINDOW:
                    for msg in self._outbox.after(last_seq, WINDOW - len(inflight)):
                        inflight[msg.seq] = self._client.publish(msg.topic, msg.payload, qos=QOS, retain=msg.retain)
                        last_seq = msg.seq
                if self.metrics is not None:
                    self.metrics.mqtt_outbox_depth.set(self._outbox.depth())
            except Exception:  # the sender must outlive any one bad moment (disk full, ...): log and go on
                log.exception("MQTT sender: unexpected error; retrying")
                time.sleep(0.5)


def start_result_publisher(settings: Settings, metrics: Metrics | None = None,
                           send: bool = True) -> ResultPublisher | None:
    """The running publisher, or None when ``mqtt_host`` is empty (publishing off)."""
    if not settings.mqtt_host:
        return None
    publisher = ResultPublisher(settings, metrics)
    publisher.start(send=send)
    return publisher
