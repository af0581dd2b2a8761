"""Shared fixtures: tiny random LLaMA models saved as HF folders, and servers on them (helpers live in helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import RunningServer, make_tiny_model, start_server
from transformers import LlamaForCausalLM

from tsqp.model.loading import LoadedModel, load


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny(tiny_path: Path) -> LoadedModel:
    return load(tiny_path, with_tokenizer=False)


@pytest.fixture(scope="session")
def tiny_hf(tiny_path: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


@pytest.fixture
def tiny_server(tiny: LoadedModel) -> Iterator[RunningServer]:
    running = start_server(tiny)
    yield running
    running.close()


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The default model as tsqp caches it (converted from its GGUF on first use)."""
    from tsqp.model.loading import resolve

    return resolve("smollm2")


@pytest.fixture(scope="session")
def tiny_chat_path(smollm2_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaMA that speaks through SmolLM2's real tokenizer and chat template: fast CLI runs."""
    import shutil

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny-chat"), vocab_size=49152, bos_token_id=1, eos_token_id=2)
    for f in smollm2_folder.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, folder / f.name)
    return folder
