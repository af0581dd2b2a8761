"""Call sites: the products one forward pass makes, as the shields key their masks and checks."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tsqp.model.linear import GroupKey, product_sites

Site = GroupKey | str  # (layer, modules) of a LINEAR call, or "lm_head"


def site_weights(weights: Mapping[str, torch.Tensor], n_layers: int) -> dict[Site, tuple[torch.Tensor, list[int]]]:
    """Every call site's W_t (K, N) in float32 (fused as on the server) and its modules' output sizes."""
    return {key: (w_t.float(), sizes) for key, w_t, sizes in product_sites(weights, n_layers)}  # float products in the TEE


# Where each call group comes in a layer's forward pass (attention, then the MLP).
_FORWARD_POSITION = {"q_proj": 0, "o_proj": 1, "gate_proj": 2, "down_proj": 3}


def forward_order(site: Site) -> tuple[int, int]:
    """Sort key: the order in which one forward pass calls the sites, lm_head last."""
    return (1 << 30, 0) if site == "lm_head" else (site[0], _FORWARD_POSITION[site[1][0]])


def call_rows(site: Site, tokens: int) -> int:
    """Rows a forward pass over `tokens` tokens sends to `site`: lm_head sees only the last position."""
    return min(tokens, 1) if site == "lm_head" else tokens


def module_names(site: Site) -> tuple[str, ...]:
    return ("lm_head",) if site == "lm_head" else site[1]


def integrity_message(site: Site, module: str, detail: str) -> str:
    where = "lm_head" if site == "lm_head" else f"layer {site[0]} {module}"
    return f"integrity check failed: the server's result for {where} is wrong ({detail}); generation stopped"
