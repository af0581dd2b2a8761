"""The one forward pass against transformers on tiny random LLaMAs: logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import local_llama, make_tiny_model, start_server
from transformers import LlamaForCausalLM

from tsqp.model.loading import LoadedModel, load
from tsqp.tee.generation import generate
from tsqp.tee.llama import Llama, causal_mask
from tsqp.wire.client import RemoteBackend

LOGIT_TOLERANCE = 1e-4  # fp32 on a tiny model; observed differences are ~1e-6


def reference_tokens(hf: LlamaForCausalLM, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=["gqa", "llama3-rope", "linear-rope", "mha-tied"])
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, LlamaForCausalLM]:
    overrides: dict[str, object] = {
        "gqa": dict(tie_word_embeddings=False),
        "llama3-rope": dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),  # fmt: skip
        "linear-rope": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    }[request.param]
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param), seed=1, **overrides)
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return load(folder, with_tokenizer=False), hf


def test_prefill_logits_match_transformers(variant: tuple[LoadedModel, LlamaForCausalLM]) -> None:
    model, hf = variant
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
    llama = local_llama(model)
    got = llama.forward(ids, llama.new_cache(64, batch=2), all_logits=True)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < LOGIT_TOLERANCE


def test_kv_cache_decode_matches_full_forward(variant: tuple[LoadedModel, LlamaForCausalLM]) -> None:
    model, hf = variant
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits[0, -1]
    llama = local_llama(model)
    cache = llama.new_cache(32)
    llama.forward(ids[:, :10], cache)
    llama.forward(ids[:, 10:20], cache)  # a chunk continuing a filled cache: mask offset matters
    for t in range(20, 24):
        logits = llama.forward(ids[:, t : t + 1], cache)
    assert cache.length == 24
    assert (logits[0, -1] - expected).abs().max().item() < LOGIT_TOLERANCE


def test_split_greedy_tokens_match_transformers_generate(variant: tuple[LoadedModel, LlamaForCausalLM]) -> None:
    model, hf = variant
    running = start_server(model)
    remote = RemoteBackend(running.endpoint, timeout_s=10)
    try:
        remote.hello(model.fingerprint)
        split = Llama(model.config, model.hf_config, model.norms(), remote)
        for seed in range(3):
            prompt = torch.randint(0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
            expected = reference_tokens(hf, prompt, 32)
            assert generate(split, prompt, 32).token_ids == expected
            assert generate(local_llama(model), prompt, 32).token_ids == expected
    finally:
        remote.close()
        running.close()


def test_remote_backend_gives_the_local_tokens(tiny: LoadedModel) -> None:
    running = start_server(tiny)
    remote = RemoteBackend(running.endpoint, timeout_s=10)
    try:
        remote.hello(tiny.fingerprint)
        llama_remote = Llama(tiny.config, tiny.hf_config, tiny.norms(), remote)
        prompt = list(range(5, 25))
        remote_result = generate(llama_remote, prompt, 24)
        local_result = generate(local_llama(tiny), prompt, 24)
        assert remote_result.token_ids == local_result.token_ids
        # Round trips: prefill and each decode step cost 4 per layer + embedding + lm_head.
        steps = len(remote_result.token_ids)
        assert remote.stats.round_trips == 1 + steps * (4 * tiny.config.n_layers + 2)
    finally:
        remote.close()
        running.close()


def test_offloaded_attention_matches_local_attention(tiny: LoadedModel, tiny_hf: LlamaForCausalLM) -> None:
    ids = torch.randint(0, tiny.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    calls = []
    llama = local_llama(tiny, offload_attention_from=8)
    matmul = llama.backend.matmul
    llama.backend.matmul = lambda a, b: calls.append(a.shape) or matmul(a, b)
    got = llama.forward(ids, llama.new_cache(40), all_logits=True)
    with torch.no_grad():
        expected = tiny_hf(ids).logits
    assert len(calls) == 2 * tiny.config.n_layers  # QKᵀ and AV of each layer went to the backend
    assert (got - expected).abs().max().item() < LOGIT_TOLERANCE


def test_forward_runs_without_grad_even_when_caller_enables_it(tiny: LoadedModel) -> None:
    llama = local_llama(tiny)
    with torch.enable_grad():
        logits = llama.forward(torch.tensor([[1, 2, 3]]), llama.new_cache(8))
    assert not logits.requires_grad


def test_decode_steps_run_on_the_decode_threads_and_prefills_on_all(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split's runner decodes on one thread (its products run elsewhere); prefills keep torch's
    threads, and the count is back as it was after every forward, whatever the forward did."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: current[0])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: current.__setitem__(0, n))
    current = [4]
    llama = local_llama(tiny, decode_threads=1)
    seen: list[int] = []
    linear = llama.backend.linear
    llama.backend.linear = lambda *args, **kwargs: seen.append(current[0]) or linear(*args, **kwargs)
    generate(llama, list(range(5, 25)), 3)  # a 20-token prefill, then two decode steps
    per_forward = 4 * tiny.config.n_layers
    assert seen == [4] * per_forward + [1] * 2 * per_forward and current == [4]
    seen.clear()
    local = local_llama(tiny)  # no decode_threads (all in the TEE: its products want the threads)
    local_linear = local.backend.linear
    local.backend.linear = lambda *args, **kwargs: seen.append(current[0]) or local_linear(*args, **kwargs)
    generate(local, list(range(5, 25)), 3)
    assert seen == [4] * 3 * per_forward


def test_causal_mask_offsets_for_a_continuing_chunk() -> None:
    mask = causal_mask(2, 5)  # 3 cached positions, 2 new queries
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_unknown_folder_contents_fail_clearly(tmp_path: Path) -> None:
    from tsqp.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="not found"):
        load(tmp_path / "nope")
