"""Use tsqp from Python: connect to a server, generate, read the timings.

    tsqp serve-gpu --endpoint tcp://127.0.0.1:5555 &
    python examples/python_api.py --endpoint tcp://127.0.0.1:5555

Without --endpoint the session starts (and afterwards stops) a private server.
"""

from __future__ import annotations

import argparse

import tsqp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default=None, help="server address; default: a private server")
    parser.add_argument("--model", default="smollm2", help="smollm2, an HF folder or a .gguf file")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    with tsqp.connect(args.endpoint, model=args.model) as session:
        result = session.generate(args.prompt, max_new_tokens=args.max_new_tokens)
    t = result.timings
    print(result.text)
    print(
        f"{len(result.token_ids)} tokens; prefill {t['prefill_s']:.3f} s; {t['decode_tokens_per_s']:.1f} tok/s; "
        f"{t['round_trips']:.0f} round trips; {t['bytes_sent'] / 1e6:.1f} MB sent, {t['bytes_received'] / 1e6:.1f} MB received"
    )


if __name__ == "__main__":
    main()
