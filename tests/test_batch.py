"""tsqp.tee.batch: continuous batching. Sequences decoded together get exactly their single-sequence answers,
a step costs the round trips of one sequence, otp masks every row afresh and seqmix mixes within one sequence."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import torch
from helpers import RunningServer, local_llama, shielded_session, start_server

from tsqp.model.loading import LoadedModel
from tsqp.shields.backend import ShieldedBackend
from tsqp.tee.batch import Batcher
from tsqp.tee.generation import Sampling, generate
from tsqp.wire.client import RemoteBackend

PROMPTS = [list(range(5, 29)), [7, 3, 9], list(range(100, 140)), [42] * 6, list(range(200, 211)), [1, 2], list(range(60, 77)), [300, 5, 17, 9]]


@pytest.fixture(scope="module")
def server(tiny: LoadedModel) -> Iterator[RunningServer]:
    running = start_server(tiny)
    yield running
    running.close()


def test_forward_many_equals_one_forward_per_sequence(tiny: LoadedModel) -> None:
    llama = local_llama(tiny)
    ids = [torch.tensor([p]) for p in PROMPTS[:3]]
    alone = [llama.forward(i, llama.new_cache(64), all_logits=True) for i in ids]
    together = llama.forward_many([(i, llama.new_cache(64)) for i in ids], all_logits=True)
    for a, b in zip(alone, together):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_batched_greedy_answers_equal_single_answers_with_join_and_leave(tiny: LoadedModel) -> None:
    llama = local_llama(tiny)
    lengths = [12, 3, 20, 1, 9, 15, 6, 11]  # sequences leave at different steps
    expected = [generate(llama, p, n).token_ids for p, n in zip(PROMPTS, lengths)]
    batcher = Batcher(llama, prefill_chunk=7, max_batch=5)  # small chunks and slots: newcomers join mid-decode
    requests = [batcher.submit(p, Sampling(n)) for p, n in zip(PROMPTS[:4], lengths[:4])]
    for _ in range(3):
        batcher.step()
    requests += [batcher.submit(p, Sampling(n)) for p, n in zip(PROMPTS[4:], lengths[4:])]
    batcher.run()
    assert [r.wait().token_ids for r in requests] == expected
    assert [r.wait().finish_reason for r in requests] == ["length"] * 8


def test_seeded_sampling_is_the_same_batched_or_alone(tiny: LoadedModel) -> None:
    llama = local_llama(tiny)
    sampling = Sampling(10, temperature=0.9, top_k=40, top_p=0.95, seed=11)
    alone = [generate(llama, p, 10, temperature=0.9, top_p=0.95, seed=11, top_k=40).token_ids for p in PROMPTS[:4]]
    batcher = Batcher(llama)
    requests = [batcher.submit(p, sampling) for p in PROMPTS[:4]]
    batcher.run()
    assert [r.wait().token_ids for r in requests] == alone


@pytest.mark.parametrize("shield", ["plain", "otp"])
def test_round_trips_per_step_do_not_grow_with_the_sequences(shield: str, tiny: LoadedModel, server: RunningServer) -> None:
    session = shielded_session(tiny, server.endpoint, shield)
    stats = session.backend.stats if isinstance(session.backend, RemoteBackend) else session.backend.remote.stats

    def decode_step_round_trips(n: int) -> int:
        batcher = session.batcher()
        for p in PROMPTS[:n]:
            batcher.submit(p, Sampling(8))
        while any(r.fed < len(r.prompt_ids) for r in batcher.active + list(batcher.pending)):
            batcher.step()  # prefills, until every sequence decodes
        batcher.step()
        before = stats.round_trips
        batcher.step()  # a pure decode step: every sequence contributes one row
        assert len(batcher.active) == n
        return stats.round_trips - before

    one, eight = decode_step_round_trips(1), decode_step_round_trips(8)
    assert one == eight == 4 * tiny.config.n_layers + 1 + (shield == "plain")  # the plain shield embeds remotely
    session.close()


@pytest.mark.parametrize("shield", ["plain", "otp", "seqmix", "noise"])
def test_batched_answers_equal_single_answers_under_every_shield(shield: str, tiny: LoadedModel, server: RunningServer) -> None:
    session = shielded_session(tiny, server.endpoint, shield)
    alone = [session.generate(p, 8).token_ids for p in PROMPTS]
    assert [g.token_ids for g in session.generate_many(PROMPTS, 8)] == alone  # prompts within one chunk: the same numbers
    session.close()


def test_otp_gives_every_row_of_a_batched_step_a_fresh_mask(tiny: LoadedModel, server: RunningServer) -> None:
    session = shielded_session(tiny, server.endpoint, "otp")
    assert isinstance(session.backend, ShieldedBackend)
    seen: set[bytes] = set()
    handed_out = 0

    def fingerprint(site: object, masks: torch.Tensor) -> None:
        nonlocal handed_out
        seen.update(hashlib.sha256(repr(site).encode() + row.numpy().tobytes()).digest() for row in masks)
        handed_out += masks.shape[0]

    session.backend.shield.pool.on_take = fingerprint
    session.generate_many(PROMPTS, 6)
    rows = sum(len(p) + 5 for p in PROMPTS)  # every prompt token, then 5 decoded tokens fed back, per sequence
    assert handed_out == 4 * tiny.config.n_layers * rows + 6 * len(PROMPTS)  # lm_head: one row per sampled token
    assert len(seen) == handed_out
    session.close()


def test_seqmix_mixes_rows_within_one_sequence_only(tiny: LoadedModel, server: RunningServer) -> None:
    session = shielded_session(tiny, server.endpoint, "seqmix")
    assert isinstance(session.backend, ShieldedBackend)
    shield = session.backend.shield
    mask = shield.mask
    sizes: list[int] = []

    def spy(site: object, x: torch.Tensor) -> object:
        sizes.append(x.shape[0])
        return mask(site, x)

    shield.mask = spy
    batcher = session.batcher(prefill_chunk=128)
    for p in PROMPTS[:3]:
        batcher.submit(p, Sampling(2))
    batcher.step()  # the three prompts, prefilled in one step
    assert sizes[: 3 * 4] == [len(p) for p in PROMPTS[:3]] * 4  # each site's call masks each prompt apart
    session.close()
