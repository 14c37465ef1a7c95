"""What the OPC UA server trusts: its certificate and key, the client certificates it accepts, and its users.

Read once, before the server starts (and by ``clipshot serve`` before the model loads), so a bad file ends
start-up with one line naming the setting instead of a server that refuses every PLC. Passwords are checked
against Mosquitto's password-file format (``user:$7$…``, PBKDF2-SHA512; ``$6$`` salted SHA-512 is read too):
the tool a plant's IT already uses for the broker (``mosquitto_passwd``) makes the OPC UA users file, and
``python -m app.serving.opcua_security USER`` prints a line where Mosquitto is not installed.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app.core.config import Settings, env_var

PBKDF2_ITERATIONS = 101  # what mosquitto_passwd writes; the file stays readable by both
SALT_BYTES = 12  # mosquitto_passwd's salt length
MIN_RSA_BITS = 2048  # Basic256Sha256 requires 2048-4096 bit RSA keys
CERT_SUFFIXES = (".der", ".pem", ".crt", ".cer")


class OpcUaConfigError(RuntimeError):
    """The OPC UA server cannot start (bad file, port taken, extra not installed): one line naming the setting."""


@dataclass
class OpcUaSecurity:
    """Loaded, checked security material: DER bytes for asyncua, the trusted folder, user -> stored password."""

    certificate_der: bytes | None = None
    private_key_der: bytes | None = None
    application_uri: str | None = None
    trusted_clients: Path | None = None
    users: dict[str, str] = field(default_factory=dict, repr=False)

    def check_password(self, username: str, password: str | None) -> bool:
        """True when ``password`` matches the user's stored (hashed or plain) password."""
        stored = self.users.get(username)
        return stored is not None and password is not None and verify_password(stored, password)


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    """``$7$iterations$salt$hash`` as ``mosquitto_passwd`` writes it (PBKDF2-HMAC-SHA512, 64-byte hash)."""
    salt = os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(stored: str, password: str) -> bool:
    """Compare in constant time against a ``$7$``/``$6$`` hash, or a plain password from ``opcua_users``."""
    given = password.encode()
    if stored.startswith("$7$"):
        _, _, iterations, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.pbkdf2_hmac("sha512", given, base64.b64decode(salt), int(iterations), len(expected))
        return hmac.compare_digest(actual, expected)
    if stored.startswith("$6$"):
        _, _, salt, digest = stored.split("$")
        return hmac.compare_digest(hashlib.sha512(given + base64.b64decode(salt)).digest(), base64.b64decode(digest))
    return hmac.compare_digest(given, stored.encode())


def _well_formed(stored: str) -> bool:
    try:
        verify_password(stored, "")
    except (ValueError, TypeError):  # wrong number of fields, bad base64 or iteration count
        return False
    return True


def read_users_file(path: Path) -> dict[str, str]:
    """``user:hash`` lines of a Mosquitto password file (``#`` comments and blank lines skipped)."""
    setting = env_var("opcua_users_file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        raise OpcUaConfigError(f"cannot read the OPC UA users file {path} ({exc}); check {setting}") from exc
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, stored = line.partition(":")
        if not name or not stored.startswith(("$7$", "$6$")) or not _well_formed(stored):
            raise OpcUaConfigError(f"line {number} of the OPC UA users file {path} is not `user:$7$…` (make it "
                                   f"with mosquitto_passwd); check {setting}")
        users[name] = stored
    if not users:
        raise OpcUaConfigError(f"the OPC UA users file {path} names no user; check {setting}")
    return users


def _read(path: Path, setting: str, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OpcUaConfigError(f"cannot read the OPC UA {what} {path} ({exc.strerror or exc}); check "
                               f"{env_var(setting)}") from exc


def load_certificate(path: Path, setting: str = "opcua_certificate") -> x509.Certificate:
    """A PEM or DER certificate, whatever the file is called; a one-line error naming ``setting`` otherwise."""
    data = _read(path, setting, "certificate")
    loader = x509.load_pem_x509_certificate if b"-----BEGIN" in data else x509.load_der_x509_certificate
    try:
        return loader(data)
    except ValueError as exc:
        raise OpcUaConfigError(f"{path} is not an X.509 certificate (PEM or DER): {exc}; check "
                               f"{env_var(setting)}") from exc


def _load_private_key(path: Path) -> rsa.RSAPrivateKey:
    data = _read(path, "opcua_private_key", "private key")
    loader = (serialization.load_pem_private_key if b"-----BEGIN" in data
              else serialization.load_der_private_key)
    try:
        key = loader(data, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: the key is encrypted
        raise OpcUaConfigError(f"{path} is not an unencrypted private key (PEM or DER): {exc}; check "
                               f"{env_var('opcua_private_key')}") from exc
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < MIN_RSA_BITS:
        raise OpcUaConfigError(f"{path} must be an RSA key of at least {MIN_RSA_BITS} bits for Basic256Sha256; "
                               f"check {env_var('opcua_private_key')}")
    return key


def _application_uri(certificate: x509.Certificate) -> str | None:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def load_security(settings: Settings) -> OpcUaSecurity:
    """Read and cross-check every OPC UA security file the settings name (``OpcUaConfigError`` if one is bad)."""
    s = settings
    security = OpcUaSecurity(users=dict(item.split(":", 1) for item in s.opcua_users))
    if s.opcua_users_file is not None:
        security.users.update(read_users_file(s.opcua_users_file))
    if not s.opcua_secure:
        return security
    assert s.opcua_certificate and s.opcua_private_key and s.opcua_trusted_clients  # the settings check this
    certificate = load_certificate(s.opcua_certificate)
    key = _load_private_key(s.opcua_private_key)
    if certificate.public_key() != key.public_key():  # any key type: a non-RSA certificate is a mismatch too
        raise OpcUaConfigError(f"the private key {s.opcua_private_key} does not belong to the certificate "
                               f"{s.opcua_certificate}; check {env_var('opcua_private_key')}")
    if not s.opcua_trusted_clients.is_dir():
        raise OpcUaConfigError(f"{s.opcua_trusted_clients} is not a folder of trusted client certificates; check "
                               f"{env_var('opcua_trusted_clients')}")
    for path in sorted(s.opcua_trusted_clients.iterdir()):
        if path.suffix.lower() in CERT_SUFFIXES:
            load_certificate(path, "opcua_trusted_clients")  # a broken file there: say which, at start-up
    security.certificate_der = certificate.public_bytes(serialization.Encoding.DER)
    security.private_key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption())
    security.application_uri = _application_uri(certificate)
    security.trusted_clients = s.opcua_trusted_clients
    return security


def main() -> int:
    """Print a ``user:$7$…`` line for ``opcua_users_file`` (the password is asked for, never echoed)."""
    if len(sys.argv) != 2 or ":" in sys.argv[1]:
        print("usage: python -m app.serving.opcua_security USER  (prints USER:$7$... for the users file)",
              file=sys.stderr)
        return 2
    password = getpass.getpass(f"password for {sys.argv[1]}: ")
    if not password or password != getpass.getpass("again: "):
        print("the passwords are empty or differ", file=sys.stderr)
        return 1
    print(f"{sys.argv[1]}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
