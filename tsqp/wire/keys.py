"""CURVE keys for the client–server link, in ZeroMQ's own certificate format.

`tsqp keys generate DIR --name NAME` writes `NAME.key` (public: give it to the other side)
and `NAME.key_secret` (secret, mode 0600: it stays where it was made). The server loads its
secret file and lets in only the clients whose public `*.key` files are in its
`--allow-clients` folder; a client loads its own secret file and the server's public file,
which also authenticates the server. With keys the link is encrypted (CurveZMQ).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from tsqp.errors import AuthError

KeyPath = str | os.PathLike[str]
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_MAKE_KEYS = "make a key pair with `tsqp keys generate DIR`"


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    allow_dir: Path  # the public *.key files of the clients let in


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server: bytes  # the server's public key: a different server fails the handshake


def generate(folder: KeyPath, name: str = "tsqp", force: bool = False) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret (0600) into `folder`; returns (public, secret) paths."""
    if not _NAME.fullmatch(name):
        raise AuthError(f"key name {name!r} must be letters, digits, '_', '.' or '-' (not starting with '.' or '-')")
    folder = Path(folder)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [p for p in (public, secret) if p.exists()]
    if existing and not force:
        raise AuthError(f"{existing[0]} already exists; pass --force to replace the key pair (peers that trust the old key will refuse the new one)")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for p in existing:
            p.unlink()  # rewriting in place would keep an old, possibly wider, file mode
        # Created 0600 before any key is written, so the secret is never readable by others.
        os.close(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        zmq.auth.create_certificates(folder, name)
        secret.chmod(0o600)
    except OSError as e:
        raise AuthError(f"cannot write a key pair into {folder}: {e.strerror or e}") from None
    return public, secret


def load_secret(path: KeyPath) -> tuple[bytes, bytes]:
    """(public, secret) keys from a NAME.key_secret file."""
    public, secret = _load(path, "secret key file")
    if secret is None:
        raise AuthError(f"{path} holds no secret key (is it the public NAME.key file? pass NAME.key_secret)")
    return public, secret


def load_public(path: KeyPath) -> bytes:
    """The public key of a NAME.key file (a NAME.key_secret file holds it too)."""
    return _load(path, "public key file")[0]


def _load(path: KeyPath, what: str) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.exists():
        raise AuthError(f"{what} {path} not found ({_MAKE_KEYS})")
    if not path.is_file():
        raise AuthError(f"{what} {path} is not a file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as e:
        raise AuthError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except ValueError:
        raise AuthError(f"{path} is not a ZeroMQ CURVE certificate: no public-key line ({_MAKE_KEYS})") from None
    if not all(_is_key(k) for k in (public, secret) if k is not None):
        raise AuthError(f"{path} is not a valid ZeroMQ CURVE certificate: keys must be 40 Z85 characters ({_MAKE_KEYS})")
    return public, secret


def _is_key(key: bytes) -> bool:
    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except Exception:  # z85 raises KeyError or ValueError on characters outside its alphabet
        return False


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise AuthError("this libzmq was built without CURVE support; install pyzmq's wheel, which has it")


def server_keys(curve_secret: KeyPath | None, allow_clients: KeyPath | None) -> ServerKeys | None:
    """The server's keys and allowed clients, checked now so that mistakes show before the model loads."""
    if (curve_secret is None) != (allow_clients is None):
        raise AuthError("--curve-secret and --allow-clients go together: the server's secret key file and the folder of client public keys it lets in")
    if curve_secret is None or allow_clients is None:
        return None
    _require_curve()
    public, secret = load_secret(curve_secret)
    folder = Path(allow_clients)
    if not folder.is_dir():
        raise AuthError(f"--allow-clients {folder} is not a folder of client public keys (NAME.key files)")
    allowed = sorted(folder.glob("*.key"))  # what zmq.auth reads, checked here: it would skip a bad file silently
    if not allowed:
        raise AuthError(f"no client public keys (*.key files) in {folder}: copy each client's NAME.key there")
    for path in allowed:
        load_public(path)
    return ServerKeys(public, secret, folder)


def client_keys(curve_secret: KeyPath | None, server_key: KeyPath | None) -> ClientKeys | None:
    if (curve_secret is None) != (server_key is None):
        raise AuthError("--curve-secret and --server-key go together: this client's secret key file and the server's public key file")
    if curve_secret is None or server_key is None:
        return None
    _require_curve()
    public, secret = load_secret(curve_secret)
    return ClientKeys(public, secret, load_public(server_key))


def start_curve_server(socket: zmq.Socket, keys: ServerKeys, log: logging.Logger) -> ThreadAuthenticator:
    """Make `socket` (not yet bound) a CURVE server that lets in only the clients in `keys.allow_dir`.

    The authenticator answers ZAP requests for the socket's whole context, so one CURVE
    server per context; stop it when the server closes.
    """
    auth = ThreadAuthenticator(socket.context, log=_RefusalLog(log, {}))
    try:
        auth.start()
    except zmq.ZMQError as e:  # EADDRINUSE: another authenticator already serves this context
        auth.stop()
        raise AuthError(f"cannot start the CURVE authenticator: {e}") from None
    auth.configure_curve(domain="*", location=str(keys.allow_dir))
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True
    return auth


def set_client_keys(socket: zmq.Socket, keys: ClientKeys) -> None:
    """Before connect: CURVE on a client socket (DEALER)."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = keys.server


class _RefusalLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """zmq.auth logs a refused key at debug level only; an operator must see it at the default level."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if level == logging.DEBUG:
            text = str(msg) % args if args else str(msg)
            if text.startswith("DENIED"):  # "DENIED (CURVE) domain=* client_key=b'…'"
                level, msg, args = logging.WARNING, "refused a client whose CURVE public key is not allowed: %s", (text,)
        super().log(level, msg, *args, **kwargs)
