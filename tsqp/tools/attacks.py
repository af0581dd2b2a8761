"""The curious server's stronger attacks on privacy, each a function of the public model and recorded traffic.

- `unmix_rank_one` (against seqmix): a prefill's mixed rows are Z = D·X + α·vᵀ with v = βᵀX, so
  every row lies in the plane spanned by its own token's row and one direction v shared by all.
  Cancelling that direction (projecting it out of the rows and of the vocabulary's references)
  leaves each row a multiple of its token's reference; v is estimated from Z's top singular
  vectors and refined by alternating least squares over the guesses.
- `decode_noise` (against noise): sequential maximum-likelihood decoding. Every LINEAR input is
  X + s·rms(X)·G with G Gaussian, and the input at position i of every call site of the first
  layers is a known function of the tokens up to i. Position by position, candidate tokens are
  run through those layers and scored by the Gaussian log-likelihood of all their rows together,
  plus the model's log-probability of the token after the tokens already decoded (a prior the
  server has: it holds the model).
- `permutation_chance`: the baseline any score is read against, the share of positions a guess
  matches when the truth is shuffled (it counts frequent tokens, which 1/V does not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from tsqp.model.linear import CALL_GROUPS, FORWARD_ORDER, LinearWeights
from tsqp.model.loading import LoadedModel
from tsqp.tee.llama import KVCache, Llama, rms_norm

Site = tuple[int, tuple[str, ...]]
NOISE_LAYERS = 4  # decoding reads the first 4 layers' inputs (the issue's measurement)
WIDE = 1024  # candidates per position through layer 0, by their layer-0 row and the prior
NARROW = 32  # the best of those through every decoded layer


# --- seqmix ---------------------------------------------------------------------------------


def unmix_rank_one(z: np.ndarray, references: np.ndarray, inits: int = 4, iters: int = 5) -> np.ndarray:
    """z (T, D) mixed rows, references (V, D) unit rows -> the token of each row.

    With v known, row i projected off v is d_i·P·x_i: its nearest reference by |cosine| after
    the same projection is its token. Tried from each of Z's top singular vectors; the start
    whose guesses fit best (sum of cosines) wins.
    """
    z = z.astype(np.float64)
    if z.shape[0] < 3:  # one or two rows: too few to find the shared direction; a lone row is just scaled
        return _nearest(z, references)
    zr = (z.astype(np.float32) @ references.T).astype(np.float64)  # (T, V)
    zz = (z * z).sum(-1)
    best_fit, best = -1.0, np.zeros(z.shape[0], dtype=np.int64)
    for start in np.linalg.svd(z, full_matrices=False)[2][:inits]:
        v = start / np.linalg.norm(start)
        for _ in range(iters):
            rv = (references @ v.astype(np.float32)).astype(np.float64)  # (V,)
            zv = z @ v  # (T,)
            cosine = np.abs(zr - np.outer(zv, rv)) / np.sqrt(np.maximum(zz - zv**2, 1e-30))[:, None] / np.sqrt(np.maximum(1 - rv**2, 1e-12))
            guesses, fit = cosine.argmax(-1), float(cosine.max(-1).sum())
            v = _refit_direction(z, references[guesses].astype(np.float64), v)
        if fit > best_fit:
            best_fit, best = fit, guesses
    return best


def _refit_direction(z: np.ndarray, r: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Least squares z_i ≈ d_i·r_i + a_i·v for every row (2×2 normal equations), then v from the residuals."""
    rv, zv, zr = r @ v, z @ v, (z * r).sum(-1)
    det = np.maximum(1 - rv**2, 1e-12)  # r and v are unit vectors
    d, a = (zr - rv * zv) / det, (zv - rv * zr) / det
    v = (a[:, None] * (z - d[:, None] * r)).sum(0)
    return v / max(float(np.linalg.norm(v)), 1e-30)


def _nearest(z: np.ndarray, references: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(z, axis=-1, keepdims=True)
    return np.abs((z / np.where(norms > 0, norms, 1.0)).astype(np.float32) @ references.T).argmax(-1)


# --- noise ----------------------------------------------------------------------------------


class _Truncated(Exception):
    """Raised at lm_head: the decoder needs the first layers' inputs only."""


class _CapturingBackend:
    """The public weights in-process, keeping each call's last-position input (the candidates' rows).

    The last call of the last layer (`layers - 1`'s down_proj) is captured but not computed: its
    output only feeds the lm_head, which the decoder never reaches (a quarter of a layer's products)."""

    def __init__(self, weights: LinearWeights, layers: int) -> None:
        self.weights = weights
        self.inputs: dict[Site, torch.Tensor] = {}
        self.unread: Site = (layers - 1, FORWARD_ORDER[-1])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weights.embed(token_ids)

    def linear(self, layer: int, modules: Sequence[str], x: torch.Tensor, groups: Sequence[int] | None = None) -> list[torch.Tensor]:
        site = (layer, tuple(modules))
        self.inputs[site] = x.reshape(-1, x.shape[-1])  # (C, K): each candidate feeds one token
        if site == self.unread:
            return [x.new_zeros(*x.shape[:-1], self.weights.out_features(self.weights.check_linear(layer, modules)))]
        return self.weights.linear(layer, modules, x)

    def lm_head(self, x: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
        raise _Truncated

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


def gaussian_log_likelihood(wire: torch.Tensor, x: torch.Tensor, scale: float, squares: torch.Tensor | None = None) -> torch.Tensor:
    """log p(wire | x) for wire = x + scale·rms(x)·G, G standard Gaussian: wire (K,), x (C, K) -> (C,).

    ‖wire − x‖² as ‖x‖² − 2·x·wire + ‖wire‖²: one pass over x and no (C, K) temporaries (against the whole
    vocabulary's rows, 15 against 121 ms a position); the cancellation costs ~1e-4 of a score, not its ranking.
    `squares`, ‖x‖² per row (`row_squares(x)`), when x is read at every position: the same scores, half the reading."""
    squares = row_squares(x) if squares is None else squares
    distance = (squares - 2 * (x @ wire) + wire.dot(wire)).clamp_min(0)
    c = scale * (squares / x.shape[-1]).sqrt().clamp_min(1e-12)
    return -distance / (2 * c * c) - x.shape[-1] * c.log()


def row_squares(x: torch.Tensor) -> torch.Tensor:
    """‖x‖² of each row of x (C, K), as `gaussian_log_likelihood` computes it."""
    return torch.linalg.vector_norm(x, dim=-1).square()


@dataclass
class _Stage:
    """One pass of the decoder: the first `layers` layers run on `n` candidates, with their own KV cache."""

    llama: Llama
    capture: _CapturingBackend
    cache: KVCache
    sites: list[Site]
    n: int
    candidates: torch.Tensor | None = None  # this position's, in the cache's batch order


def decode_noise(model: LoadedModel, rows: Mapping[Site, np.ndarray], scale: float, layers: int = NOISE_LAYERS,
                 prior: bool = True, weights: LinearWeights | None = None) -> np.ndarray:  # fmt: skip
    """One sequence's tokens from its noisy LINEAR inputs: rows[(layer, modules)] (positions, K), layers < `layers`.

    Two stages per position: the likeliest `WIDE` tokens by their layer-0 row (and the model's
    likeliest next ones) run through layer 0, scored by its four rows; the best `NARROW` of
    those run through all `layers`, scored by every row. `prior` adds the public model's
    log-probability of each candidate after the decoded prefix. `weights`: the model's
    `LinearWeights`, when one is already built (several sequences decoded in turn).
    """
    layers = min(layers, model.config.n_layers)
    weights = LinearWeights(model.weights, model.config.n_layers) if weights is None else weights
    wire = {site: torch.from_numpy(np.asarray(r, dtype=np.float32)) for site, r in rows.items() if site[0] < layers}
    qkv = (0, CALL_GROUPS[0])
    positions = wire[qkv].shape[0]
    vocab = model.config.vocab_size
    stages = [_stage(model, weights, wire, depth, min(n, vocab), positions) for depth, n in ((1, WIDE), (layers, NARROW))]
    full = Llama(model.config, model.hf_config, model.norms(), weights)
    prior_cache = full.new_cache(positions)
    references = rms_norm(weights.embedding, full.norms["layers.0.attn_norm"], model.config.rms_norm_eps)  # (V, D) layer-0 rows
    reference_squares = row_squares(references)  # read at every position
    log_prior = torch.zeros(vocab)
    tokens = np.zeros(positions, dtype=np.int64)
    with torch.no_grad():
        for i in range(positions):
            score = gaussian_log_likelihood(wire[qkv][i], references, scale, reference_squares) + (log_prior if prior else 0)  # (V,)
            candidates = torch.arange(vocab)
            for stage in stages:
                keep = score.topk(stage.n).indices
                candidates, score = candidates[keep], (log_prior[candidates[keep]] if prior else torch.zeros(stage.n))
                try:
                    stage.llama.forward(candidates[:, None], stage.cache)
                except _Truncated:
                    pass
                for site in stage.sites:
                    score = score + gaussian_log_likelihood(wire[site][i], stage.capture.inputs[site].float(), scale)
                stage.candidates = candidates
            tokens[i] = int(candidates[int(score.argmax())])
            for stage in stages:  # every candidate row continues from the chosen token
                chosen = int((stage.candidates == tokens[i]).nonzero()[0, 0])  # type: ignore[union-attr]
                for k_or_v in (stage.cache.k, stage.cache.v):
                    for layer_cache in k_or_v:
                        layer_cache[:, :, i] = layer_cache[chosen, :, i].clone()
            if prior and i + 1 < positions:
                log_prior = torch.log_softmax(full.forward(torch.tensor([[tokens[i]]]), prior_cache)[0, -1].double(), -1).float()
    return tokens


def _stage(model: LoadedModel, weights: LinearWeights, wire: Mapping[Site, torch.Tensor], layers: int, n: int, positions: int) -> _Stage:
    capture = _CapturingBackend(weights, layers)
    llama = Llama(replace(model.config, n_layers=layers), model.hf_config, model.norms(), capture)
    sites = [(layer, group) for layer in range(layers) for group in CALL_GROUPS if (layer, group) in wire]
    return _Stage(llama, capture, llama.new_cache(positions, batch=n), sites, n)


# --- chance -----------------------------------------------------------------------------------


def permutation_chance(guesses: np.ndarray, truth: np.ndarray, rounds: int = 200, seed: int = 0) -> float:
    """The mean share of positions where guesses match a random permutation of the truth."""
    if truth.size == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    return float(np.mean([(guesses == rng.permutation(truth)).mean() for _ in range(rounds)]))
