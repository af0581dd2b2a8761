"""The audit's integrity attack: a lying server against each shield's --verify, on a tiny random model."""

from __future__ import annotations

import pytest

from tsqp.model.loading import LoadedModel
from tsqp.tools.steering import ATTACKS, steer

PROMPTS = [list(range(5, 17)), list(range(40, 49)), list(range(100, 120, 2))]


@pytest.mark.parametrize("shield", ["plain", "otp"])
def test_exact_shields_let_no_lie_through(shield: str, tiny: LoadedModel) -> None:
    results = {r.attack: r for r in steer(tiny, shield, PROMPTS, 8)}
    assert list(results) == list(ATTACKS)
    for r in results.values():
        assert r.changed_undetected == 0 and r.detected == len(PROMPTS), r  # every lie stops the run
    # The dtype claim is refused at HELLO; accepted by the user, its lies still fail the exact check.


def test_the_float_check_is_a_fault_detector_the_liar_spends(tiny: LoadedModel) -> None:
    results = {r.attack: r for r in steer(tiny, "seqmix", PROMPTS, 8)}
    assert results["tolerance"].detected == 0  # inside the tolerance: never noticed
    assert results["dtype-claim"].detected == len(PROMPTS)  # the claim itself is refused at HELLO
    accepted = results["dtype-claim-accepted"]
    assert accepted.detected == 0 and accepted.changed_undetected == len(PROMPTS), accepted  # once the user accepts it
