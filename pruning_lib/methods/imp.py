"""Iterative magnitude pruning (IMP) with rewinding: the lottery-ticket procedure, method only.

Frankle & Carbin (2019), "The lottery ticket hypothesis", Sec. 2, "iterative pruning":

1. initialise ``w_0`` and train; with late rewinding (Frankle et al. 2019, "Stabilizing the LTH") keep the
   weights ``w_k`` of iteration ``k`` as the rewind point (``k = 0``: the initialisation; the dense unit's
   ``snapshots``, :mod:`pruning_lib.dense`);
2. score the trained weights ``w_f`` with a criterion (:mod:`pruning_lib.methods.criteria`) and remove
   ``p %`` of the surviving weights of each layer (20 % of hidden, 10 % of output weights by default,
   :func:`layer_rates`) or of all layers together (``scope="global"``): :func:`prune_round`;
3. rewind the survivors to ``w_k`` (:func:`load_masked`), train again, and repeat from 2.

After ``n`` rounds with per-layer rates ``p_l`` a fraction ``sum_l N_l (1 - p_l)^n / sum_l N_l`` of the
weights is left (:func:`expected_remaining`; 51.3, 21.1, 7.0, 3.6, 1.85 % at n = 3, 7, 12, 15, 18 for
LeNet-300-100). Only weights are pruned, never biases. The chain of rounds, its cache and its controls
live in the chapter (:mod:`pruning_lib.chapters.lottery_tickets`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import data as data_mod, masks as masks_mod
from ..masks import Mask
from ..train import cross_entropy
from . import criteria as crit


def layer_rates(model: nn.Module, rate_hidden: float, rate_output: float, rate_conv: float = 0.0,
                names: list[str] | None = None) -> dict[str, float]:
    """Per-layer pruning rates: convs ``rate_conv``, hidden linear layers ``rate_hidden``, the last linear
    layer (the output) ``rate_output`` (Frankle & Carbin 2019, Fig. 2)."""
    names = masks_mod.prunable_names(model) if names is None else names
    linear = [n for n in names if isinstance(model.get_submodule(n.rpartition(".")[0]), nn.Linear)]
    out_name = linear[-1] if linear else None
    rates = {}
    for n in names:
        module = model.get_submodule(n.rpartition(".")[0])
        rates[n] = (rate_output if n == out_name else rate_hidden if isinstance(module, nn.Linear)
                    else rate_conv)
    return rates


def expected_remaining(model: nn.Module, rates: dict[str, float], rounds: int) -> float:
    """Closed-form fraction of weights left after ``rounds`` rounds of per-layer pruning."""
    params = dict(model.named_parameters())
    return masks_mod.remaining_fraction_per_layer(rates, {n: params[n].numel() for n in rates}, rounds)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy ``state`` (from :func:`pruning_lib.models.weights`) into the parameters of ``model``, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v.to(params[n].device))
    return model


def load_masked(model: nn.Module, state: dict[str, torch.Tensor], mask: Mask) -> nn.Module:
    """``state`` loaded into ``model`` with ``mask`` applied: the rewind of step 3 (``state`` = ``w_k``),
    or the trained ticket to be scored (``state`` = ``w_f``)."""
    load_weights(model, state)
    masks_mod.apply_mask(model, mask)
    return model


def pack(state: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    """Trained weights stored compactly: masked parameters keep only their surviving entries."""
    return {n: (v[mask[n].cpu()] if n in mask else v) for n, v in state.items()}


def unpack(packed: dict[str, torch.Tensor], mask: Mask, template: dict[str, torch.Tensor]):
    """The inverse of :func:`pack`: pruned entries are zero, shapes those of ``template``."""
    out = {}
    for n, v in packed.items():
        if n in mask:
            full = torch.zeros_like(template[n])
            full[mask[n].cpu()] = v
            out[n] = full
        else:
            out[n] = v
    return out


def prune_round(model: nn.Module, criterion: str, rewind: dict[str, torch.Tensor], current: Mask, train,
                *, seed: int, round_: int, rates: dict[str, float] | float, scope: str = "layer",
                grad_point: str = "init", grad_batches: int = 1, grad_batch_size: int = 100) -> Mask:
    """Step 2 of one round: score the trained ``model`` (mask ``current`` applied) by ``criterion`` and
    remove ``rates`` (per layer, or one rate with ``scope="global"``) of the surviving weights.

    ``rewind`` is ``w_i`` of the criteria; the data-dependent ones average ``|dL/dw|`` over
    ``grad_batches`` batches of ``train``. The random draws depend on ``seed`` and ``round_`` only."""
    gen = torch.Generator().manual_seed(seed * 100_003 + round_)
    dev = next(model.parameters()).device
    batches = lambda: data_mod.batches(train, grad_batch_size, shuffle=True,  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed * 7919 + round_),
                                       device=dev)
    ctx = crit.ScoreContext(model, initial=rewind, loss_fn=cross_entropy, batches=batches,
                            grad_batches=grad_batches, grad_point=grad_point, names=list(current),
                            generator=gen)
    return crit.prune(criterion, ctx, rates, scope=scope, current=current)


def round_metrics(history: pd.DataFrame, offset: int = 0) -> dict[str, float]:
    """Early stop = the evaluation with the lowest validation loss (Frankle & Carbin 2019, Sec. 2)."""
    h = history[history.step > 0] if (history.step > 0).any() else history
    best = h.loc[h.val_loss.idxmin()]
    last = history.iloc[-1]
    return {"early_stop_iteration": int(best.step) + offset, "val_loss": float(best.val_loss),
            "test_accuracy_early_stop": float(best.get("test_accuracy", np.nan)),
            "test_accuracy_end": float(last.get("test_accuracy", np.nan)),
            "end_iteration": int(last.step) + offset}
