"""tsqp.server.warming: the server reads ahead the weights of the calls a forward pass makes next."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tsqp.model.linear import FORWARD_ORDER, LinearWeights
from tsqp.model.loading import LoadedModel
from tsqp.server.warming import Warmer


@pytest.fixture
def recorded(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> tuple[LinearWeights, list[Any]]:
    """The tiny model's weights, whose `warm` records the sites it is asked to read (two blocks each)."""
    weights = LinearWeights(tiny.weights, tiny.config.n_layers)
    reads: list[Any] = []

    def warm(key: Any) -> Any:
        reads.append(key)
        yield
        yield

    monkeypatch.setattr(weights, "warm", warm)
    return weights, reads


def run(warmer: Warmer, steps: int = 1000) -> None:
    for _ in range(steps):
        warmer.step()


def forward(n_layers: int = 3) -> list[Any]:
    return [(layer, group) for layer in range(n_layers) for group in FORWARD_ORDER]


def test_it_reads_the_sites_that_follow_within_its_budget(recorded: tuple[LinearWeights, list[Any]]) -> None:
    weights, reads = recorded
    order = forward()
    budget = sum(weights.group_bytes(site) for site in order[1:4])
    warmer = Warmer(weights, ahead_bytes=budget)
    run(warmer)
    assert reads == []  # nothing answered yet: nothing to follow
    warmer.answered(order[0])
    run(warmer)
    assert reads == order[1:4]  # as far as the budget goes, and no further
    warmer.answered(order[2])  # the calls that were read for (o, gate|up): their bytes are free again
    run(warmer)
    # The tiny model's KiB: q|k|v 32, o 16, gate|up 80, down 40; the budget 136. Down's 40 still ahead,
    # then the next layer's q|k|v and o fit, its gate|up does not.
    assert reads == order[1:6]


def test_a_call_out_of_order_starts_again_from_it(recorded: tuple[LinearWeights, list[Any]]) -> None:
    weights, reads = recorded
    order = forward()
    warmer = Warmer(weights, ahead_bytes=weights.group_bytes(order[1]) + weights.group_bytes(order[2]))
    warmer.answered(order[0])
    run(warmer)
    reads.clear()
    warmer.answered(order[7])  # another client, or a new forward
    run(warmer)
    assert reads == order[8:10]
    reads.clear()
    warmer.answered("embed")
    run(warmer)
    assert reads == order[0:2]


def test_nothing_is_read_past_the_last_layer_or_off_a_cpu(recorded: tuple[LinearWeights, list[Any]], tiny: LoadedModel) -> None:
    weights, reads = recorded
    warmer = Warmer(weights, ahead_bytes=1 << 30)
    warmer.answered(forward()[-2])
    run(warmer)
    assert reads == [forward()[-1]]  # then the lm_head, too large to be worth it
    bf16 = Warmer(LinearWeights(tiny.weights, tiny.config.n_layers, dtype=torch.bfloat16))
    bf16.answered("embed")
    assert bf16.step() is None and bf16._reading is None  # numpy cannot read bfloat16: nothing to do


def test_a_block_is_read_per_step(recorded: tuple[LinearWeights, list[Any]]) -> None:
    weights, reads = recorded
    warmer = Warmer(weights)
    warmer.answered("lm_head")
    warmer.step()
    assert reads == [forward()[0]]  # its first block
    warmer.step()
    warmer.step()  # the second block, then the generator ends...
    warmer.step()  # ...and the next site starts
    assert reads == forward()[:2]
