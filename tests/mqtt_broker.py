"""A real Mosquitto broker for tests: its own process, config and persistence folder, on a free loopback port.

Why a real broker: what has to hold (QoS 1 acknowledgements, re-sending after the broker died, in order)
lives in the protocol exchange, which a fake would have to reimplement. ``kill`` + ``start`` restarts it on
the same port, like a broker that crashed and came back. Skips where Mosquitto is not installed, except under
``CI=true``, where a missing broker fails the test (CI must run these; ``.ci/run`` installs the package).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT_S = 10


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None)


def require_mosquitto() -> str:
    binary = mosquitto_binary()
    if binary is None:
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail("CI must run the MQTT tests: install the broker (apt-get install -y mosquitto)")
        pytest.skip("Mosquitto not installed (apt-get install -y mosquitto); CI runs these tests")
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Broker:
    """``start`` / ``kill`` / ``stop`` one Mosquitto on ``port``; persistence keeps queued messages across restarts."""

    def __init__(self, folder: Path, extra_config: str = "", anonymous: bool = True) -> None:
        self.binary = require_mosquitto()
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous {str(anonymous).lower()}\npersistence true\n"
            f"persistence_location {folder}/\nautosave_interval 1\nautosave_on_changes true\n"
            f"max_queued_messages 0\nlog_dest file {folder}/broker.log\n"
            # as root Mosquitto switches to the `mosquitto` user, which cannot write the test's private folder
            f"{'user root' if os.geteuid() == 0 else ''}\n{extra_config}")

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.process.stderr.read().decode()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start listening") from None
                time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered, like a hung broker or a black-holed network."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@contextmanager
def running_broker(folder: Path, extra_config: str = "") -> Iterator[Broker]:
    broker = Broker(folder, extra_config)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


class Subscriber:
    """A persistent-session QoS 1 subscriber that counts every delivery per ``message_id``.

    Persistent (clean_session off, fixed client id): while it is disconnected the broker queues its messages,
    so a result published in the moment the broker is back but the subscriber is not is still delivered.
    """

    def __init__(self, port: int, topic: str = "#", client_id: str = "test-subscriber") -> None:
        import paho.mqtt.client as mqtt

        self.counts: Counter[str] = Counter()
        self.messages: list[dict] = []
        self.topics: list[str] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the subscriber did not subscribe"

    def _on_message(self, client, userdata, message) -> None:
        body = json.loads(message.payload)
        with self._lock:
            self.counts[body["message_id"]] += 1
            self.messages.append(body)
            self.topics.append(message.topic)

    def wait_for(self, ids: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if ids <= set(self.counts):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
