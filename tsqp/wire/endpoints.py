"""Where the two sides meet: which endpoints a keyless server may listen on, socket set-up, handshake events.

Each of these is needed by both the client and the server, and written once here.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from pathlib import Path
from typing import Any

import zmq

from tsqp.errors import AuthError, EndpointError

CONNECT_TIMEOUT_S = 2.0  # a client reports that nothing listens after this; replies have their own timeout
READY = "tsqp serve-gpu ready"  # the line serve-gpu prints once it answers; a private server's parent waits for it
HTTP_READY = "tsqp serve-tee ready"  # the line serve-tee prints once its HTTP socket accepts requests (bench and tests wait for it)

# A failed security handshake is final: libzmq would retry it forever without a word.
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
HANDSHAKE_ERRORS = {  # by protocol error; whichever side notices first closes, so the other may see no detail
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "it has no CURVE keys (security mechanism mismatch)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "its CURVE handshake failed (does it use this server's public key?)",
}


SCHEMES = ("tcp", "ipc", "inproc")
FORMS = "tcp://HOST:PORT or ipc://PATH"


def check_endpoint(endpoint: str) -> str:
    """`endpoint` if ZeroMQ can use it; else `EndpointError` naming what is wrong (scheme, path, host or port)."""
    scheme, separator, rest = endpoint.partition("://")
    if not separator:
        raise EndpointError(f"endpoint {endpoint!r} has no scheme; give {FORMS}")
    if scheme not in SCHEMES:
        raise EndpointError(f"endpoint {endpoint!r}: scheme {scheme!r} is not supported; give {FORMS}")
    if scheme != "tcp":
        if not rest:
            raise EndpointError(f"endpoint {endpoint!r} names no path; give {FORMS}")
        return endpoint
    host, colon, port = rest.rpartition(":")
    if not colon or not host.strip("[]"):
        raise EndpointError(f"endpoint {endpoint!r} needs a host and a port, as in tcp://127.0.0.1:5555")
    if port != "*" and not (port.isdigit() and int(port) <= 65535):
        raise EndpointError(f"endpoint {endpoint!r}: port {port!r} is not a number from 0 to 65535")
    return endpoint


def new_socket(context: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
    """A socket for `endpoint` that drops unsent messages on close (a dead peer must not block an exit)."""
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IPV6, "[" in endpoint)  # tcp://[::1]:PORT; IPv4 endpoints stay plain
    return socket


def frame_buffer(frame: Any) -> memoryview:
    """The bytes of a received zmq.Frame (or of bytes / a buffer about to be sent), without a copy."""
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame)


def is_local_endpoint(endpoint: str) -> bool:
    """True for endpoints only this user on this host can reach: ipc:// files (with the folder's permissions),
    inproc:// and loopback tcp://. An abstract socket (ipc://@name) has no permissions: any local user reaches it."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc":
        return not rest.startswith("@")
    if scheme == "inproc":
        return True
    if scheme != "tcp":
        return False
    host = rest.rpartition(":")[0].strip("[]").lower()  # tcp://HOST:PORT or tcp://[IPv6]:PORT
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8, ::1
    except ValueError:
        return False  # *, an interface or a host name: assume other hosts can reach it


def check_listen_allowed(endpoint: str, curve: bool, insecure_public: bool) -> None:
    """Without keys anyone who reaches the server could use it and read the traffic: loopback only, unless accepted."""
    if not curve and not insecure_public and not is_local_endpoint(endpoint):
        reach = "any local user can connect to an abstract socket" if endpoint.startswith("ipc://@") else "unauthenticated, unencrypted link"
        raise AuthError(f"refusing to listen on {endpoint} without keys ({reach})")


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ipc:// endpoint; None for other schemes and abstract sockets (ipc://@name)."""
    scheme, _, rest = endpoint.partition("://")
    return Path(rest) if scheme == "ipc" and not rest.startswith("@") else None


def check_free(endpoint: str) -> None:
    """`EndpointError` if another process listens at `endpoint`, or if an ipc:// path is a file that is not a socket.

    Checked before a server loads its model, and before it binds: libzmq would unlink whatever lies at an
    ipc:// path, a live server's socket (which then serves on, unreachable) or a user's file alike.
    """
    scheme, _, rest = endpoint.partition("://")
    if scheme == "tcp":
        _check_port_free(endpoint, rest)
        return
    path = ipc_path(endpoint)
    if path is None or not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise EndpointError(f"cannot listen on {endpoint}: {path} exists and is not a socket (it would be deleted); pick another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return  # a dead server's socket file: binding replaces it
    raise EndpointError(f"cannot listen on {endpoint}: another server is listening there; stop it or pick another path")


def _check_port_free(endpoint: str, rest: str) -> None:
    host, _, port = rest.rpartition(":")
    if port in ("*", "0"):
        return
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq binds: a port in TIME_WAIT is free
        try:
            probe.bind(("" if host == "*" else host, int(port)))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise EndpointError(f"cannot listen on {endpoint}: the port is in use; stop what holds it or pick another port") from None
            # an interface name, or an address not on this host: libzmq's bind gives the verdict


def remove_socket_file(path: Path, inode: int) -> None:
    """Remove the socket file a server bound, unless another has replaced it since (same path, new inode)."""
    try:
        if os.lstat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass
