"""`tsqp bench`: prefill latency, decode speed and where each decoded token's time goes.

Modes, each measured for every prompt size:

- `hf-generate`: transformers' own `generate` in this process (the reference speed);
- `local`: tsqp's core with the linear ops in this process (the all-in-TEE baseline);
- one mode per shield: split inference through a server.

tsqp modes run the one `tsqp.generation.generate` loop, with end-of-sequence ignored so
every run decodes exactly `new_tokens` tokens. The wire counters of the client are
snapshotted when the first token comes out of the prefill, so every per-token figure
covers the decode forwards only (the prefill has its own `prefill_s`).

A decoded token's time (`1 / decode tokens/s`) is split into parts:

- `serialization`: encoding requests and decoding replies in the TEE;
- `server_compute`: the compute time the server reports for its replies;
- `wire`: round trip minus server compute (transport, server-side (de)serialization, scheduling);
- `mask_unmask`, `verify`: shield work;
- `mask_stall`: calls waiting for their masks (the pool short: made by the call, or by the worker while it waits);
- `tee_compute`: the rest, i.e. the non-linear work, sampling and the loop itself.

Modules: `config` (what to measure, the prompts, the private server), `runs` (the measured
runs), `load` (concurrent clients), `results` (the numbers and their aggregation), `machine`
(machine facts, peak memory), `report` (the table) and `plot`.
"""
