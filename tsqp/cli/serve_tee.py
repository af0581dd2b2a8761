"""`tsqp serve-tee`: the trusted runner as an OpenAI-compatible HTTP service (continuous batching inside)."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from tsqp.cli.console import err, fail
from tsqp.cli.options import (
    ActivationBitsOpt,
    ConnectTimeoutOpt,
    CurveSecretOpt,
    Device,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    EndpointOpt,
    ModelOpt,
    NoiseScaleOpt,
    ResearchShieldsOpt,
    ServerKeyOpt,
    ShieldOpt,
    TimeoutOpt,
    VerifyOpt,
    WeightBitsOpt,
    shield_config,
)
from tsqp.cli.sessions import open_session
from tsqp.shields.config import ACTIVATION_BITS, NOISE_SCALE, WEIGHT_BITS
from tsqp.tee.batch import MAX_BATCH, PREFILL_CHUNK
from tsqp.wire.endpoints import CONNECT_TIMEOUT_S, HTTP_READY, is_local_endpoint


def serve_tee(
    model: ModelOpt = "smollm2",
    endpoint: EndpointOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on. Beyond loopback only with TLS (or --insecure-public).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port, printed in the ready line).")] = 8000,
    ssl_certfile: Annotated[
        Path | None, typer.Option("--ssl-certfile", metavar="FILE", help="TLS certificate (PEM): HTTPS, ended inside this process.")
    ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option("--ssl-keyfile", metavar="FILE", help="TLS private key (PEM) for --ssl-certfile.")] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option("--api-key-file", metavar="FILE", help="Accept only requests with `Authorization: Bearer KEY` for a KEY in this file (one per line)."),
    ] = None,
    insecure_public: Annotated[
        bool, typer.Option("--insecure-public", help="Listen beyond loopback without TLS (prompts and answers cross the network in clear).")
    ] = False,
    served_model_name: Annotated[
        str | None, typer.Option("--served-model-name", help="The model id clients name in requests and /v1/models lists. Default: --model's value.")
    ] = None,
    prefill_chunk: Annotated[
        int, typer.Option("--prefill-chunk", min=1, help="Prompt tokens per batched step: newcomers' prefill interleaves with the others' decode.")
    ] = PREFILL_CHUNK,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Sequences decoding at once; more requests wait their turn.")] = MAX_BATCH,
    timeout: TimeoutOpt = 60.0,
    connect_timeout: ConnectTimeoutOpt = CONNECT_TIMEOUT_S,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.float32,
    curve_secret: CurveSecretOpt = None,
    server_key: ServerKeyOpt = None,
    shield: ShieldOpt = "otp",
    verify: VerifyOpt = None,
    precompute: Annotated[
        int,
        typer.Option(
            "--precompute",
            min=0,
            help="Masks for this many tokens made before serving, and made again whenever the server is idle (otp's and noise's offline phase).",
        ),
    ] = 0,
    noise_scale: NoiseScaleOpt = NOISE_SCALE,
    weight_bits: WeightBitsOpt = WEIGHT_BITS,
    activation_bits: ActivationBitsOpt = ACTIVATION_BITS,
    research_shields: ResearchShieldsOpt = False,
) -> None:
    """Serve the model over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions (SSE streaming or not), /v1/models, /health.

    Prompts and answers exist in clear only in this (trusted) process: TLS ends here, and
    every linear op goes to the accelerator under the shield (otp by default). Concurrent
    requests decode together, one accelerator call per linear op for all of them.

    Example: tsqp serve-tee --port 8000   (then: curl http://127.0.0.1:8000/v1/models)

    Example: tsqp serve-tee -e tcp://gpu-host:5555 --curve-secret me.key_secret --server-key gpu.key --host 0.0.0.0 --ssl-certfile cert.pem --ssl-keyfile key.pem --api-key-file keys.txt
    """
    shielding = shield_config(shield, verify, precompute, noise_scale, weight_bits, activation_bits, research_shields, dtype.value)
    tls = _tls_context(ssl_certfile, ssl_keyfile)
    api_keys = _api_keys(api_key_file) if api_key_file is not None else []
    if tls is None and not insecure_public and not is_local_endpoint(f"tcp://{f'[{host}]' if ':' in host else host}:{port}"):
        fail(
            f"refusing to listen on {host} without TLS (prompts would cross the network in clear): pass --ssl-certfile and --ssl-keyfile, or --insecure-public to accept that"
        )
    listener = _listen(host, port)  # before the model loads: a busy port is a one-line error at once
    session = open_session(model, endpoint, False, timeout, shielding, device, dtype.value, curve_secret, server_key, connect_timeout=connect_timeout)
    import uvicorn

    from tsqp.tee.openai_api import Engine, create_app

    with session:
        engine = Engine(session, prefill_chunk, max_batch, keep_masks=precompute)
        model_id = served_model_name or model
        app = create_app(engine, model_id, api_keys)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5,
                                ssl_certfile=str(ssl_certfile) if tls else None, ssl_keyfile=str(ssl_keyfile) if tls else None)  # fmt: skip
        server = uvicorn.Server(config)
        scheme = "https" if tls else "http"
        bound = listener.getsockname()
        url = f"{scheme}://{f'[{bound[0]}]' if ':' in bound[0] else bound[0]}:{bound[1]}"
        info = session.shield_info()
        threading.Thread(target=_announce, args=(server, f"{HTTP_READY} on {url} (model {model_id}, shield {info['shield']}"
                                                          f"{' + verify' if info['verify'] else ''}, {'API keys' if api_keys else 'no API keys'})"),
                         daemon=True).start()  # fmt: skip
        engine.start()
        try:
            server.run(sockets=[listener])
        finally:
            engine.close()
    err.print("tsqp serve-tee stopped")


def _announce(server: object, line: str) -> None:
    """Print the ready line once uvicorn accepts connections."""
    started = threading.Event()
    while not getattr(server, "started", False) and not getattr(server, "should_exit", False):
        started.wait(0.05)
    if getattr(server, "started", False):
        print(line, flush=True)


def _tls_context(certfile: Path | None, keyfile: Path | None) -> ssl.SSLContext | None:
    """Check the certificate and key before anything loads (uvicorn would fail only once the model is up)."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        fail("TLS needs both --ssl-certfile and --ssl-keyfile")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        fail(f"cannot use {certfile} and {keyfile} for TLS: {getattr(e, 'strerror', None) or e}")
    return context


def _api_keys(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the API key file {escape(str(path))}: {getattr(e, 'strerror', None) or e}")
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        fail(f"the API key file {escape(str(path))} holds no key (one per line)")
    return keys


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as e:
        listener.close()
        fail(f"cannot listen on {host}:{port}: {e.strerror}")
    listener.listen(2048)
    return listener
