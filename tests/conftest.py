"""Shared fixtures: tiny random LLaMA models saved as HF folders, and servers on them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq
from transformers import LlamaConfig, LlamaForCausalLM

from tsqp.model.loading import LoadedModel, load
from tsqp.server.server import Server

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            initializer_range=0.15)  # large enough that greedy choices are not near-ties  # fmt: skip


def make_tiny_model(folder: Path, seed: int = 0, **overrides: object) -> Path:
    """Save a random LLaMA (grouped-query attention by default) as an HF folder."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny(tiny_path: Path) -> LoadedModel:
    return load(tiny_path, with_tokenizer=False)


@pytest.fixture(scope="session")
def tiny_hf(tiny_path: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


class RunningServer:
    def __init__(self, server: Server, thread: threading.Thread, stop: threading.Event) -> None:
        self.server, self.thread, self.stop = server, thread, stop
        self.endpoint = server.endpoint

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()


def start_server(model: LoadedModel, endpoint: str = "tcp://127.0.0.1:0", **kwargs: object) -> RunningServer:
    """A real ROUTER server in a background thread; the OS picks the port."""
    server = Server(model, endpoint, device="cpu", context=zmq.Context.instance(), **kwargs)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
    thread.start()
    return RunningServer(server, thread, stop)


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
