"""One server, several trusted runners at once: every client gets exactly its own answer."""

from __future__ import annotations

import threading
import time

from conftest import start_server

from tsqp.client import RemoteBackend
from tsqp.core import Llama
from tsqp.generation import generate
from tsqp.linear import LinearWeights
from tsqp.models import LoadedModel


def test_four_concurrent_clients_get_their_single_client_tokens(tiny: LoadedModel) -> None:
    prompts = [list(range(start, start + 9)) for start in (3, 50, 120, 200)]
    local = Llama(tiny.config, tiny.hf_config, tiny.norms(), LinearWeights(tiny.weights, tiny.config.n_layers))
    expected = [generate(local, p, 24).token_ids for p in prompts]
    running = start_server(tiny)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        remote = RemoteBackend(running.endpoint, timeout_s=30)  # one DEALER per client, as separate runners have
        try:
            remote.hello(tiny.fingerprint)
            llama = Llama(tiny.config, tiny.hf_config, tiny.norms(), remote)
            results[i] = generate(llama, prompts[i], 24).token_ids
        except BaseException as e:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(e)
        finally:
            remote.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    started = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        running.close()
    elapsed = time.perf_counter() - started
    assert not errors, errors
    assert [results[i] for i in range(len(prompts))] == expected
    print(f"4 clients: {4 * 24 / elapsed:.0f} tokens/s aggregate")  # reported, not asserted
    linear_calls = running.server.stats.ops["LINEAR"].calls
    assert linear_calls == 4 * 24 * 4 * tiny.config.n_layers  # every client's every projection, none lost or doubled
