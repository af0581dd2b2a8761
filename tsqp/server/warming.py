"""Reading the weights of the calls a forward pass makes next into the CPU's caches, while a same-host client computes.

A decode step's products read every matrix once from memory (about 530 MB a SmolLM2 token), and between two
calls the server only waits for its client. `Warmer` spends that wait reading ahead: after a call for one
site, the sites that follow it in a forward pass (`LinearWeights.next_site`), up to `ahead_bytes`, a block
at a time (`LinearWeights.warm`), so that their products read from cache rather than memory. The server
calls `step` between looks at its channels, so a request waits at most one block's read.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from tsqp.model.linear import GroupKey, LinearWeights
from tsqp.wire.protocol import Message

WARM_AHEAD_BYTES = 12 << 20  # o, gate|up and down of a SmolLM2 layer: well inside a server CPU's last-level cache
_DONE = object()


def site_of(msg: Message) -> GroupKey | str:
    """The site a checked EMBED, LINEAR or LM_HEAD request used: "embed", (layer, modules) or "lm_head"."""
    return (msg.args["layer"], tuple(msg.args["modules"])) if msg.op == "LINEAR" else msg.op.lower()


class Warmer:
    def __init__(self, weights: LinearWeights, ahead_bytes: int = WARM_AHEAD_BYTES) -> None:
        self.weights, self.ahead_bytes = weights, ahead_bytes
        self._ahead: deque[GroupKey] = deque()  # sites read or being read, in the order a forward calls them
        self._ahead_bytes = 0
        self._last: GroupKey | str | None = None  # the site answered last: reading goes on from there
        self._reading: Iterator[None] | None = None
        self._done = not weights.cpu_float32  # nothing left to read until the next answer (or ever, off a CPU)

    def answered(self, site: GroupKey | str) -> None:
        """A request for `site` was answered: what was read for it is used, and what follows it comes next."""
        if site in self._ahead:
            while self._pop() != site:
                pass
            if not self._ahead:
                self._reading = None  # it was being read: the rest is no use now
        else:  # not the call a forward makes next (another client, a new forward): start again from it
            self._ahead.clear()
            self._ahead_bytes, self._reading = 0, None
        self._last = site
        self._done = not self.weights.cpu_float32

    def step(self) -> None:
        """Read one more block, if anything is left to read within the budget."""
        if self._done:
            return
        if self._reading is None and not self._start_next():
            self._done = True
            return
        if next(self._reading, _DONE) is _DONE:  # type: ignore[arg-type]
            self._reading = None

    def _start_next(self) -> bool:
        frontier = self._ahead[-1] if self._ahead else self._last
        following = self.weights.next_site(frontier) if frontier is not None else None
        if following is None or self._ahead_bytes + self.weights.group_bytes(following) > self.ahead_bytes:
            return False
        self._ahead.append(following)
        self._ahead_bytes += self.weights.group_bytes(following)
        self._reading = self.weights.warm(following)
        return True

    def _pop(self) -> GroupKey:
        site = self._ahead.popleft()
        self._ahead_bytes -= self.weights.group_bytes(site)
        return site
