"""tsqp.tee.generation: `sample` (greedy, temperature, top-p) and the one `generate` loop."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import local_llama

from tsqp.errors import InputError
from tsqp.model.loading import LoadedModel
from tsqp.tee.generation import Sampling, generate, penalize_repetition, sample
from tsqp.tee.session import TextStream

# --- sample ----------------------------------------------------------------------------------


def test_sampling() -> None:
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    assert sample(logits) == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_p=0.5, generator=g) for _ in range(50)}
    assert draws == {1}  # top token alone holds > 50% of the mass
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_p=0.99, generator=g) for _ in range(200)}
    assert draws == {1, 2}
    a = [sample(logits, 2.0, 1.0, torch.Generator().manual_seed(7)) for _ in range(5)]
    assert len(set(a)) == 1  # same seed, same draw


def test_greedy_takes_the_first_maximum_and_ignores_top_p() -> None:
    logits = torch.tensor([1.0, 3.0, 3.0, 0.0])
    assert sample(logits) == 1  # a tie goes to the first, as torch.argmax in transformers
    assert sample(logits, temperature=-1.0) == 1  # any temperature <= 0 is greedy
    assert sample(logits, temperature=0.0, top_p=0.01, generator=torch.Generator().manual_seed(0)) == 1


def test_top_p_below_the_top_token_keeps_the_top_token_alone() -> None:
    logits = torch.tensor([2.0, 1.9, 1.8, 1.7])  # flat: at temperature 10 each token has about a quarter
    g = torch.Generator().manual_seed(1)
    assert {sample(logits, temperature=10.0, top_p=1e-6, generator=g) for _ in range(100)} == {0}
    g = torch.Generator().manual_seed(1)
    assert {sample(logits, temperature=10.0, top_p=1.0, generator=g) for _ in range(200)} == {0, 1, 2, 3}


def test_sampling_at_temperature_one_follows_the_softmax() -> None:
    logits = torch.tensor([math.log(0.7), math.log(0.2), math.log(0.1)])
    g = torch.Generator().manual_seed(2)
    n = 4000
    draws = torch.tensor([sample(logits, temperature=1.0, generator=g) for _ in range(n)])
    for token, p in enumerate((0.7, 0.2, 0.1)):
        frequency = float((draws == token).double().mean())
        assert abs(frequency - p) < 6 * math.sqrt(p * (1 - p) / n), (token, frequency)


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.tensor([1.0, 0.0])  # softmax: 0.73 / 0.27
    n = 2000

    def share_of_top(temperature: float) -> float:
        g = torch.Generator().manual_seed(3)
        return sum(sample(logits, temperature, generator=g) == 0 for _ in range(n)) / n

    assert share_of_top(0.1) > 0.99  # exp(10): practically greedy
    assert 0.4 < share_of_top(100.0) < 0.6  # exp(0.01): practically a coin


# --- generate --------------------------------------------------------------------------------


def test_generation_stops_at_eos_and_keeps_it(tiny: LoadedModel) -> None:
    llama = local_llama(tiny)
    free = generate(llama, [3, 4, 5], 10)
    eos = free.token_ids[3]
    stopped = generate(local_llama(tiny), [3, 4, 5], 10, eos_ids={eos})
    first = free.token_ids.index(eos)
    assert stopped.token_ids == free.token_ids[: first + 1]


def test_prompt_longer_than_the_context_is_a_clear_error(tiny: LoadedModel) -> None:
    from tsqp.errors import InputError

    with pytest.raises(InputError, match="context of 256"):
        generate(local_llama(tiny), list(range(1, 250)), 10)
    with pytest.raises(InputError, match="empty"):
        generate(local_llama(tiny), [], 10)


def test_prompt_and_new_tokens_may_fill_the_context_exactly(tiny: LoadedModel) -> None:
    from tsqp.errors import InputError

    prompt = list(range(1, 251))  # 250 + 6 = 256, the tiny model's context
    assert len(generate(local_llama(tiny), prompt, 6).token_ids) == 6
    with pytest.raises(InputError, match="251 prompt tokens \\+ 6 new tokens"):
        generate(local_llama(tiny), [0, *prompt], 6)


def test_generate_reports_every_token_and_its_timings(tiny: LoadedModel) -> None:
    prompt = [7, 8, 9, 10]
    seen: list[int] = []
    result = generate(local_llama(tiny), prompt, 8, on_token=seen.append)
    assert len(result.token_ids) == 8
    assert seen == result.token_ids  # each token as it is chosen, in order
    assert result.prompt_token_ids == [7, 8, 9, 10] and result.prompt_token_ids is not prompt
    assert result.text == ""  # generate works on ids; text is the session's business
    t = result.timings
    assert set(t) == {"prefill_s", "decode_s", "decode_steps", "decode_tokens_per_s", "total_s"}
    assert t["decode_steps"] == 7  # the prefill gives the first token, each further one costs a forward
    assert 0 < t["prefill_s"] <= t["total_s"]
    assert t["decode_tokens_per_s"] == pytest.approx(7 / t["decode_s"])


def test_eos_as_the_first_token_stops_after_the_prefill(tiny: LoadedModel) -> None:
    first = generate(local_llama(tiny), [3, 4, 5], 1).token_ids[0]
    seen: list[int] = []
    result = generate(local_llama(tiny), [3, 4, 5], 10, eos_ids=[first], on_token=seen.append)
    assert result.token_ids == seen == [first]
    assert result.timings["decode_steps"] == 0 and result.timings["decode_tokens_per_s"] == 0.0


def test_greedy_generation_is_the_argmax_of_each_forward(tiny: LoadedModel) -> None:
    prompt = [11, 12, 13]
    result = generate(local_llama(tiny), prompt, 5)
    llama = local_llama(tiny)
    ids = list(prompt)
    for token in result.token_ids:  # the same tokens from full forwards without a cache
        logits = llama.forward(torch.tensor([ids]), llama.new_cache(len(ids)))
        assert token == int(torch.argmax(logits[0, -1]))
        ids.append(token)


def test_seeded_sampling_is_reproducible_and_the_seed_matters(tiny: LoadedModel) -> None:
    def run(seed: int) -> list[int]:
        return generate(local_llama(tiny), [20, 21, 22], 12, temperature=1.5, seed=seed).token_ids

    assert run(5) == run(5)
    assert len({tuple(run(seed)) for seed in range(4)}) > 1


# --- top-k, repetition penalty, finish reasons, stop strings -----------------------------------


def test_top_k_keeps_only_the_k_best_tokens() -> None:
    logits = torch.tensor([2.0, 1.9, 1.8, 1.7])
    g = torch.Generator().manual_seed(4)
    assert {sample(logits, temperature=10.0, top_k=2, generator=g) for _ in range(200)} == {0, 1}


def test_repetition_penalty_demotes_seen_tokens_as_transformers_does() -> None:
    logits = torch.tensor([2.0, -1.0, 1.5])
    got = penalize_repetition(logits, [0, 1], 2.0)
    assert got.tolist() == [1.0, -2.0, 1.5]  # positive divided, negative multiplied, unseen untouched
    assert penalize_repetition(logits, [0], 1.0) is logits


def test_finish_reason_is_length_or_stop(tiny: LoadedModel) -> None:
    llama = local_llama(tiny)
    first = generate(llama, [5, 6, 7], 4)
    assert first.finish_reason == "length" and len(first.token_ids) == 4
    stopped = generate(llama, [5, 6, 7], 4, eos_ids={first.token_ids[1]})
    assert stopped.finish_reason == "stop" and stopped.token_ids == first.token_ids[:2]
    by_callback = generate(llama, [5, 6, 7], 4, on_token=lambda t: t == first.token_ids[0])
    assert by_callback.finish_reason == "stop" and by_callback.token_ids == first.token_ids[:1]


@pytest.mark.parametrize("bad", [Sampling(0), Sampling(temperature=-1), Sampling(top_p=0.0), Sampling(top_k=-2), Sampling(repetition_penalty=0.0)])
def test_sampling_settings_out_of_range_are_refused(bad: Sampling) -> None:
    with pytest.raises(InputError):
        bad.validate()


class _CharTokenizer:
    """One character per token id: enough to test stop strings and streaming."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_stop_strings_end_the_text_and_are_never_streamed() -> None:
    deltas: list[str] = []
    stream = TextStream(_CharTokenizer(), deltas.append, stop=["END", "\n\n"])
    stops = [stream.push(ord(c)) for c in "Hello ENough. Bye END tail"]
    assert stops.index(True) == len("Hello ENough. Bye END") - 1  # the token that completes "END"
    assert stream.finish() == "Hello ENough. Bye "
    assert "".join(deltas) == "Hello ENough. Bye "  # "EN" was held back, then released when "o" came
    assert all("END" not in d for d in deltas)


@pytest.mark.parametrize("chunk", [1, 5, 24, 100])
def test_a_chunked_prefill_gives_the_whole_prompts_tokens_and_logits(tiny: LoadedModel, chunk: int) -> None:
    from tsqp.tee.generation import prefill

    llama, prompt = local_llama(tiny), list(range(3, 27))
    whole, chunked = llama.new_cache(40), llama.new_cache(40)
    expected = prefill(llama, prompt, whole)
    assert torch.allclose(prefill(llama, prompt, chunked, chunk), expected, atol=1e-5, rtol=1e-4)
    assert chunked.length == whole.length == len(prompt)
    assert torch.allclose(chunked.k[0][:, :, :24], whole.k[0][:, :, :24], atol=1e-5, rtol=1e-4)
    assert generate(llama, prompt, 8, prefill_chunk=chunk).token_ids == generate(llama, prompt, 8).token_ids
