"""The `tsqp` command line: parse options, call the library, render. Errors become one red line here."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tsqp.errors import IntegrityError, TsqpError
from tsqp.tee.private_server import OTP_WEIGHT_BITS

EXIT_INTEGRITY = 3  # a server result failed verification: distinct, so scripts can tell

app = typer.Typer(
    help="""Shielded split inference of LLaMA-family models.

A trusted runner (the TEE) keeps your prompt, the tokenizer and every non-linear step;
an untrusted accelerator server does the heavy linear algebra over ZeroMQ.

Examples:

  tsqp run-tee --prompt "What is the capital of France?"   (starts a private server)

  tsqp serve-gpu --endpoint tcp://127.0.0.1:5555 &

  tsqp run-tee --endpoint tcp://127.0.0.1:5555 --prompt "Hi" --json

  tsqp check-grad --path my_runner.py

  tsqp keys generate keys/ --name alice   (CURVE keys: authenticated, encrypted link)
""",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", envvar="TSQP_MODEL", help="`smollm2` (default, SmolLM2-135M-Instruct), a Hugging Face folder or a .gguf file."),
]
EndpointOpt = Annotated[
    Optional[str],
    typer.Option("--endpoint", "-e", envvar="TSQP_ENDPOINT", help="Server to use, e.g. tcp://127.0.0.1:5555 or ipc:///tmp/tsqp.sock. Default: start a private server for this run."),
]
DeviceOpt = Annotated[str, typer.Option(help="Where the server computes: auto (CUDA when available), cuda or cpu.")]
DtypeOpt = Annotated[str, typer.Option(help="Server weight dtype: float32, bfloat16 or float16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text, for scripts.")]
CurveSecretOpt = Annotated[
    Optional[Path],
    typer.Option("--curve-secret", metavar="FILE", help="This client's secret key file (NAME.key_secret from `tsqp keys generate`): authenticates to a CURVE server given by --endpoint. Needs --server-key."),
]
ServerKeyOpt = Annotated[
    Optional[Path],
    typer.Option("--server-key", metavar="FILE", help="The server's public key file (its NAME.key): proves the server is the right one and encrypts the link. Needs --curve-secret."),
]

ShieldOpt = Annotated[str, typer.Option("--shield", "-s", help="What the server may see: plain (everything: the original prototype), otp (exact one-time pad, recommended), noise (Gaussian masking) or seqmix (token mixing; hides nothing while decoding).")]
VerifyOpt = Annotated[Optional[bool], typer.Option("--verify/--no-verify", help="Check every server result with Freivalds' test and stop with an integrity error on a wrong one. Default: on with otp.")]
PrecomputeOpt = Annotated[int, typer.Option("--precompute", min=0, help="Precompute masks for this many tokens before the first request (the offline phase); more are made ahead of need in chunks.")]
NoiseScaleOpt = Annotated[float, typer.Option("--noise-scale", min=0.0, help="noise shield: mask standard deviation relative to each row's RMS.")]
WeightBitsOpt = Annotated[int, typer.Option("--weight-bits", min=2, max=16, help="otp: bits per quantized weight (per output row); 12 kept 8/8 test prompts' greedy tokens.")]
ActivationBitsOpt = Annotated[int, typer.Option("--activation-bits", min=2, max=24, help="otp: bits per fixed-point activation (per row).")]


def shield_options(shield: str, verify: bool | None, precompute: int, noise_scale: float, weight_bits: int, activation_bits: int) -> dict[str, Any]:
    """The shield settings shared by run-tee, bench and audit, checked and ready for `tsqp.connect`."""
    from tsqp.shields.base import SHIELDS

    if shield not in SHIELDS:
        _fail(f"--shield {shield!r} is not one of {', '.join(SHIELDS)}")
    return dict(shield=shield, verify=verify, precompute=precompute, noise_scale=noise_scale, weight_bits=weight_bits, activation_bits=activation_bits)


keys_app = typer.Typer(help="CURVE key pairs that authenticate and encrypt the client–server link.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _progress(message: str) -> None:
    err.log(message)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command("serve-gpu")
def serve_gpu(
    model: ModelOpt = "smollm2",
    endpoint: Annotated[str, typer.Option("--endpoint", "-e", envvar="TSQP_ENDPOINT", help="Where to listen: tcp://HOST:PORT or ipc://PATH.")] = "tcp://127.0.0.1:5555",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads for the products (default: torch's choice).")] = None,
    quiet: Annotated[bool, typer.Option(help="Print only the ready line (and security warnings).")] = False,
    log_level: Annotated[str, typer.Option(help="Logging level: debug, info, warning, error.")] = "warning",
    log_json: Annotated[bool, typer.Option("--log-json", help="Log one JSON object per line on stderr (ts, level, logger, msg, and fields such as client, op, error).")] = False,
    max_message_mb: Annotated[Optional[float], typer.Option("--max-message-mb", min=0.001, help="Refuse requests larger than this many MiB (default: room for the model's largest legitimate request).")] = None,
    max_tensor_elements: Annotated[Optional[int], typer.Option("--max-tensor-elements", min=1, help="Refuse tensors, and results, with more elements than this (default: derived from the model's config).")] = None,
    curve_secret: Annotated[Optional[Path], typer.Option("--curve-secret", metavar="FILE", help="This server's secret key file (NAME.key_secret from `tsqp keys generate`): the link becomes authenticated and encrypted. Needs --allow-clients.")] = None,
    allow_clients: Annotated[Optional[Path], typer.Option("--allow-clients", metavar="DIR", help="Folder of the public key files (*.key) of the clients let in; all others are refused and logged. Needs --curve-secret.")] = None,
    insecure_public: Annotated[bool, typer.Option("--insecure-public", help="Allow listening beyond loopback without keys (anyone who reaches the port can use the server and read the traffic).")] = False,
    record: Annotated[Optional[Path], typer.Option("--record", metavar="DIR", help="Write every tensor received to DIR (what a curious server keeps; read by `tsqp audit`). Off by default.")] = None,
    fault_rate: Annotated[float, typer.Option("--fault-rate", min=0.0, max=1.0, help="Testing integrity: corrupt one random element of this fraction of results.")] = 0.0,
    fault_seed: Annotated[Optional[int], typer.Option("--fault-seed", help="Seed of the fault injection, for reproducible runs.")] = None,
    otp_weight_bits: Annotated[int, typer.Option("--otp-weight-bits", min=0, max=16, help="Quantize the weights for otp clients of this width at start-up (0: on the first otp request).")] = OTP_WEIGHT_BITS,
    batch: Annotated[Optional[bool], typer.Option("--batch/--no-batch", help="Compute LINEAR requests of different clients that wait for the same weights at the same time as one product. Default: on with CUDA, off on CPU (slower there).")] = None,
) -> None:
    """Serve the model's linear layers (embedding, projections, lm_head) to trusted runners.

    Without keys it listens only on loopback or ipc://; with --curve-secret
    and --allow-clients only the listed clients get in, over an encrypted link.

    Example: tsqp serve-gpu --endpoint tcp://127.0.0.1:5555 --device cuda --dtype bfloat16

    Example: tsqp serve-gpu -e tcp://0.0.0.0:5555 --curve-secret keys/server.key_secret --allow-clients clients/
    """
    import torch

    from tsqp.wire.keys import server_keys
    from tsqp.model.loading import load
    from tsqp.tee.private_server import READY
    from tsqp.server.server import SERVER_DTYPES, Server, check_listen_allowed, default_limits

    from tsqp.server import logs

    try:
        logs.configure(log_level, as_json=log_json)
    except ValueError:
        _fail(f"--log-level {log_level!r} is not one of debug, info, warning, error")
    if dtype not in SERVER_DTYPES:
        _fail(f"--dtype {dtype!r} is not one of {', '.join(SERVER_DTYPES)}")
    if device not in ("auto", "cuda", "cpu"):
        _fail(f"--device {device!r} is not one of auto, cuda, cpu")
    try:  # key and endpoint mistakes show before the model loads
        curve = server_keys(curve_secret, allow_clients)
        check_listen_allowed(endpoint, curve is not None, insecure_public)
    except TsqpError as e:
        _fail(str(e))
    if curve is None:
        err.print(f"[yellow]warning:[/] no CURVE keys: the link on {escape(endpoint)} is unauthenticated and unencrypted "
                  "(see `tsqp keys generate`, --curve-secret and --allow-clients)", highlight=False)  # fmt: skip
    if threads:
        torch.set_num_threads(threads)
    with err.status("Loading model…", spinner="dots") if not quiet else _nothing():
        loaded = load(model, with_tokenizer=False, progress=_progress)
        try:
            limits = default_limits(loaded)
            if max_message_mb is not None:
                limits = dataclasses.replace(limits, max_message_bytes=int(max_message_mb * 1024 * 1024))
            if max_tensor_elements is not None:
                limits = dataclasses.replace(limits, max_tensor_elements=max_tensor_elements)
            server = Server(loaded, endpoint, device, dtype, limits=limits, curve=curve, insecure_public=insecure_public, batch=batch,
                            record_dir=record, fault_rate=fault_rate, fault_seed=fault_seed, otp_weight_bits=otp_weight_bits)  # fmt: skip
        except (ValueError, TsqpError) as e:
            _fail(str(e))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"{READY} on {server.endpoint} (device {server.device}, {dtype}, model {loaded.fingerprint[:12]}, {'CURVE' if curve else 'no keys'})", flush=True)
    try:
        server.serve_forever(stop)  # the stop flag is checked between calls: the call in flight is answered
    finally:
        server.shutdown()  # and its reply sent before the process exits
    if fault_rate:
        err.print(f"[yellow]warning:[/] --fault-rate {fault_rate:g}: this server corrupts results on purpose", highlight=False)
    if not quiet:
        err.print("tsqp serve-gpu stopped")


@app.command("run-tee")
def run_tee(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The user's message (or raw text with --no-chat).")],
    model: ModelOpt = "smollm2",
    endpoint: EndpointOpt = None,
    local: Annotated[bool, typer.Option("--local", help="Run the linear ops in this process too (the all-in-TEE baseline).")] = False,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Apply the model's chat template to the prompt.")] = True,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling: keep the smallest set of tokens with this much probability.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for any one server reply.")] = 60.0,
    offload_attention_from: Annotated[Optional[int], typer.Option(min=1, help="Also send attention's QKᵀ and AV products to the server for calls of at least this many tokens (long prefills). Default: attention stays here.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
    curve_secret: CurveSecretOpt = None,
    server_key: ServerKeyOpt = None,
    shield: ShieldOpt = "otp",
    verify: VerifyOpt = None,
    precompute: PrecomputeOpt = 0,
    noise_scale: NoiseScaleOpt = 10.0,
    weight_bits: WeightBitsOpt = OTP_WEIGHT_BITS,
    activation_bits: ActivationBitsOpt = 16,
) -> None:
    """Generate an answer; every linear op runs on the server, masked by the shield (otp by default), the rest here.

    Example: tsqp run-tee --prompt "What is the capital of France?" --max-new-tokens 32

    Example: tsqp run-tee --prompt "Hi" --shield plain --no-verify   (the unprotected baseline)
    """
    shielding = shield_options(shield, verify, precompute, noise_scale, weight_bits, activation_bits)
    from tsqp.model.loading import resolve
    from tsqp.tee.private_server import PrivateServer, shield_args

    with err.status("Loading model and connecting…", spinner="dots"):
        folder = resolve(model, _progress)
        # Started before this process imports torch, so both load side by side.
        server = PrivateServer(folder, device, dtype, extra_args=shield_args(shield, weight_bits)) if endpoint is None and not local else None
        try:
            from tsqp.tee.session import connect

            session = connect(endpoint, folder, local=local, timeout_s=timeout, connect_timeout_s=min(timeout, 10.0),
                              offload_attention_from=offload_attention_from, private_server=server,
                              curve_secret=curve_secret, server_key=server_key, **({} if local else shielding))  # fmt: skip
        except BaseException:
            if server is not None:
                server.close()
            raise
    with session:
        stream = None if as_json else (lambda text: out.print(text, end="", markup=False, highlight=False, soft_wrap=True))
        result = session.generate(prompt, max_new_tokens, temperature, top_p, seed, chat, on_text=stream)
    shield_info = session.shield_info()
    if as_json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "prompt_token_ids": result.prompt_token_ids,
                          "timings": result.timings, "shield": shield_info}))  # fmt: skip
    else:
        out.print()
        t = result.timings
        err.print(
            f"[dim]{len(result.token_ids)} tokens · {shield_info['shield']}{' + verify' if shield_info['verify'] else ''}"
            f" · prefill {t['prefill_s']:.2f} s · {t['decode_tokens_per_s']:.1f} tok/s"
            + (f" · {t['round_trips']:.0f} round trips" if "round_trips" in t else "")
            + (f" · offline masks {t['offline_s']:.2f} s, {shield_info.get('pool_peak_mib', 0):.0f} MiB" if t.get("offline_s") else "") + "[/]"
        )


@app.command("check-grad")
def check_grad(
    model: ModelOpt = "smollm2",
    endpoint: EndpointOpt = None,
    path: Annotated[Optional[list[Path]], typer.Option("--path", help="Also scan this Python file for .numpy() calls that may see grad-tracking tensors (repeatable).")] = None,
    as_json: JsonOpt = False,
    curve_secret: CurveSecretOpt = None,
    server_key: ServerKeyOpt = None,
) -> None:
    """Prove the split inference path never sends a grad-tracking tensor (exit 0 only when clean).

    Runs a real forward through the server, records every tensor the protocol serializes,
    and shows that the original `Can't call numpy() on Tensor that requires grad` failure
    does occur when grad is left on (so this check can fail).

    Example: tsqp check-grad --path tee_runner.py
    """
    from tsqp.tools.checkgrad import GradReport, control_error, scan_paths
    from tsqp.tee.session import connect

    report = GradReport()
    for p in path or []:
        if not p.is_file():
            _fail(f"--path {p}: no such file")
    try:
        report.findings = scan_paths(path or [])
    except SyntaxError as e:
        _fail(f"cannot parse {e.filename}: {e.msg} (line {e.lineno})")
    with err.status("Running a forward through the split path…", spinner="dots"):
        with connect(endpoint, model, on_send=report.record, progress=_progress, curve_secret=curve_secret, server_key=server_key) as session:
            session.generate([1, 2, 3, 4], max_new_tokens=2)
    report.control_error = control_error()
    if as_json:
        print(json.dumps({
            "clean": report.clean, "tensors_sent": len(report.sent), "tensors_requiring_grad": len(report.requiring_grad),
            "grad_enabled_in_core": report.grad_enabled_in_core, "control_error": report.control_error,
            "findings": [vars(f) for f in report.findings],
        }))  # fmt: skip
    else:
        _render_grad_report(report)
    raise typer.Exit(0 if report.clean else 1)


def _render_grad_report(report: Any) -> None:
    def status(ok: bool) -> str:
        return "[green]ok[/]" if ok else "[bold red]FAIL[/]"

    table = Table(title="check-grad: split inference path")
    table.add_column("check")
    table.add_column("result")
    table.add_column("", justify="center")
    table.add_row("grad mode inside the core", "enabled" if report.grad_enabled_in_core else "disabled (no_grad)", status(not report.grad_enabled_in_core))
    table.add_row("tensors serialized for the wire", str(len(report.sent)), status(bool(report.sent)))
    table.add_row("… of which require grad", str(len(report.requiring_grad)), status(not report.requiring_grad))
    table.add_row("control: same conversion with grad on", report.control_error or "no error raised", status(report.control_reproduced))
    table.add_row("static scan: unprotected .numpy() calls", str(len(report.findings)), status(not report.findings))
    out.print(table)
    for f in report.findings:
        out.print(f"  {f.path}:{f.line}:{f.col}  in {f.function}: [bold]{f.code}[/] — {f.reason}", highlight=False)
    out.print("[green]clean[/]" if report.clean else "[bold red]not clean[/]")


@app.command("bench")
def bench(
    model: ModelOpt = "smollm2",
    shields: Annotated[str, typer.Option(help="Comma list of split modes to measure besides the hf-generate and local baselines: plain, otp, noise, seqmix.")] = "plain,otp,noise,seqmix",
    verify: VerifyOpt = None,
    prompt_tokens: Annotated[str, typer.Option(help="Comma list of prompt lengths, in tokens.")] = "32,128,512",
    new_tokens: Annotated[int, typer.Option(min=2, help="Tokens to decode per run (end-of-sequence is ignored).")] = 64,
    repeat: Annotated[int, typer.Option(min=1, help="Timed runs per mode and prompt length (after one warm-up).")] = 5,
    json_file: Annotated[Optional[str], typer.Option("--json", metavar="FILE", help="Also write the results as JSON to FILE; `-` prints JSON to stdout instead of the table.")] = None,
    endpoint: EndpointOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="FILE.png", help="Save stacked bars of the per-token time breakdown (needs matplotlib).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for any one server reply.")] = 60.0,
    curve_secret: CurveSecretOpt = None,
    server_key: ServerKeyOpt = None,
    clients: Annotated[Optional[str], typer.Option(help="Load test: comma list of concurrent client counts, e.g. 1,2,4,8. For each N, N runner processes decode at once against one server (first prompt length, first --shields mode); reports aggregate tok/s, step p50/p99 and whether answers match a single client's.")] = None,
    batch: Annotated[Optional[bool], typer.Option("--batch/--no-batch", help="Cross-client batching in the private server (serve-gpu --batch/--no-batch). Default: the server's default for its device.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Measure prefill latency, decode speed and where each decoded token's time goes, per mode and prompt length.

    Modes: hf-generate (transformers' generate here), local (tsqp, linear ops here) and each shield (split).

    Example: tsqp bench --prompt-tokens 32,128 --new-tokens 32 --repeat 3 --json bench.json

    Load test: tsqp bench --shields plain --prompt-tokens 32 --repeat 1 --clients 1,2,4,8
    """
    from tsqp.tools.bench import runs as benchmark

    try:
        config = benchmark.BenchConfig(model, benchmark.parse_shields(shields), verify, benchmark.parse_sizes(prompt_tokens),
                                       new_tokens, repeat, endpoint, timeout,
                                       str(curve_secret) if curve_secret else None, str(server_key) if server_key else None,
                                       benchmark.parse_clients(clients) if clients is not None else [], batch=batch,
                                       device=device, dtype=dtype)  # fmt: skip
        if plot is not None:
            benchmark.require_matplotlib()
    except TsqpError as e:
        _fail(str(e))
    report = benchmark.run_with_progress(config, err)
    data = json.dumps(report.to_json(), indent=2)
    if json_file == "-":
        print(data)
    else:
        if json_file:
            Path(json_file).write_text(data + "\n")
        out.print(benchmark.render_table(report))
    if plot is not None:
        benchmark.plot(report, plot)
        err.print(f"plot saved to {plot}")
    wrong = [r.clients for r in report.load or [] if not r.answers_match_single_client]
    if wrong:
        _fail(f"load test: with {', '.join(map(str, wrong))} concurrent clients, some answers differ from the single-client answers "
              "for the same prompts (a server bug: concurrent sessions must not affect each other)")


@app.command("audit")
def audit(
    model: ModelOpt = "smollm2",
    shields: Annotated[str, typer.Option(help="Comma list of shields to attack: plain, otp, noise, seqmix.")] = "plain,otp,noise,seqmix",
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="How many of the built-in chat prompts to run per shield (at most 8).")] = 4,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens to generate per prompt (greedy).")] = 8,
    keep: Annotated[Optional[Path], typer.Option("--keep", metavar="DIR", help="Keep each shield's recording in DIR/SHIELD (default: temporary, deleted).")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Play the curious server: record each shield's traffic and try to recover the tokens from it.

    With only the public weights and what it received, the attacker guesses the prompt tokens
    (nearest vocabulary row to each layer-0 input; the token ids themselves where the server
    embeds) and the generated tokens (arg-max of each lm_head input's logits). A shield that
    hides the text leaves both at chance (1 / vocabulary size).

    Example: tsqp audit --shields plain,otp --prompts 2 --new-tokens 4 --json
    """
    from tsqp.tools.audit import PROMPTS
    from tsqp.shields.base import SHIELDS

    names = [s.strip() for s in shields.split(",") if s.strip()]
    unknown = [s for s in names if s not in SHIELDS]
    if not names or unknown or len(set(names)) != len(names):
        _fail(f"--shields {shields!r}: give distinct names from {', '.join(SHIELDS)}")
    if prompts > len(PROMPTS):
        _fail(f"--prompts {prompts}: there are {len(PROMPTS)} built-in prompts")
    from tsqp.tools.audit import run_audit

    with err.status("Auditing…", spinner="dots") as status:
        results = run_audit(model, names, PROMPTS[:prompts], new_tokens, device, dtype, keep,
                            progress=lambda message: status.update(f"Auditing: {escape(message)}…"))  # fmt: skip
    if as_json:
        print(json.dumps({"results": [r.as_dict() for r in results]}))
        return
    table = Table(title=f"audit: what a curious server recovers · {prompts} prompt(s) × {new_tokens} new tokens")
    for column in ("shield", "prompt tokens recovered", "generated tokens recovered", "chance"):
        table.add_column(column, justify="left" if column == "shield" else "right")
    for r in results:
        table.add_row(r.shield, f"{r.prompt_token_recovery:.1%} of {r.prompt_tokens}",
                      f"{r.generated_token_recovery:.1%} of {r.generated_tokens}", f"{r.chance:.4%}")  # fmt: skip
    out.print(table)


@keys_app.command("generate")
def keys_generate(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write the key pair (created if missing).")],
    name: Annotated[str, typer.Option("--name", help="File name stem: NAME.key (public) and NAME.key_secret (secret).")] = "tsqp",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair of that name.")] = False,
) -> None:
    """Write a CURVE key pair: NAME.key (public) and NAME.key_secret (secret, mode 0600).

    ZeroMQ's certificate format. Give the public file to the other side:
    a client's NAME.key goes into the server's --allow-clients folder,
    the server's NAME.key is the clients' --server-key.
    Secret files stay where they were made.

    Example: tsqp keys generate keys/ --name server
    """
    from tsqp.wire.keys import generate

    try:
        public, secret = generate(folder, name, force)
    except TsqpError as e:
        _fail(str(e))
    print(f"public key: {public}")
    print(f"secret key: {secret}")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    try:
        app()
    except TsqpError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(EXIT_INTEGRITY if isinstance(e, IntegrityError) else 1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
