"""Parameters and FLOPs, nominal and effective, per layer and in total (ShrinkBench's report).

FLOPs are counted as torch's own ``FlopCounterMode`` counts them (one multiply-add = 2 FLOPs; convolutions
and matrix products, which is where the cost of these networks lies), from forward hooks on the layers:
``FlopCounterMode`` imports ``torch._dynamo`` (~2 s in every process that counts), and
``tests/test_metrics.py`` checks the two agree on every model. *Nominal* counts describe the dense
architecture; *effective* counts discount weights removed by a :class:`~pruning_lib.masks.Mask`: a layer
whose weight keeps a fraction d of its entries keeps d of its parameters and of its FLOPs. Structured
pruning (gates) is measured after compaction (:func:`pruning_lib.gates.compact`), where nominal and
effective coincide because the layers really are smaller.
"""
from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from .masks import PRUNABLE_TYPES, Mask, current_mask


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def layer_flops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """FLOPs of one example through each conv/linear layer, keyed by module path: 2 per multiply-add, bias
    not counted (``FlopCounterMode``'s rule), summed over every call of the layer in one forward."""
    counts: dict[nn.Module, int] = {}

    def count(module: nn.Module, inputs, output: torch.Tensor) -> None:
        # each output entry is one dot product of length in_features (linear) or C_in/groups * kernel (conv)
        w = module.weight
        counts[module] = counts.get(module, 0) + 2 * output.numel() * (w.numel() // w.shape[0] if len(w) else 0)

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)]
    handles = [m.register_forward_hook(count) for _, m in layers]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {name: counts.get(m, 0) for name, m in layers}


def layer_table(model: nn.Module, input_shape: tuple[int, ...], mask: Mask | None = None) -> pd.DataFrame:
    """One row per conv/linear layer: nominal and effective parameters and FLOPs, weight density.

    ``mask`` defaults to the mask applied to the model, if any.
    """
    mask = mask if mask is not None else current_mask(model)
    flops = layer_flops(model, input_shape)
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        w = module.weight
        wname = f"{name}.weight"
        density = float(mask[wname].float().mean()) if wname in mask else 1.0
        bias = module.bias.numel() if module.bias is not None else 0
        bname = f"{name}.bias"
        bias_eff = int(mask[bname].sum()) if bname in mask else bias
        rows.append({
            "layer": name, "type": type(module).__name__, "shape": tuple(w.shape),
            "params": w.numel() + bias, "effective_params": int(round(w.numel() * density)) + bias_eff,
            "flops": flops[name], "effective_flops": int(round(flops[name] * density)), "density": density,
        })
    return pd.DataFrame(rows)


def summary(model: nn.Module, input_shape: tuple[int, ...], mask: Mask | None = None) -> dict[str, float]:
    """Totals over the whole model: nominal/effective parameters (all parameters, including batch norm)
    and FLOPs, compression ratio and theoretical speed-up (nominal / effective FLOPs)."""
    table = layer_table(model, input_shape, mask)
    other = count_parameters(model) - int(table["params"].sum())  # batch norm, gates, ...
    params, eff = int(table["params"].sum()) + other, int(table["effective_params"].sum()) + other
    flops, eff_flops = int(table["flops"].sum()), int(table["effective_flops"].sum())
    return {"params": params, "effective_params": eff, "compression": params / max(eff, 1),
            "flops": flops, "effective_flops": eff_flops, "speedup": flops / max(eff_flops, 1),
            "density": eff / max(params, 1)}


def count_connections(model: nn.Module) -> int:
    """Connections: the entries of every conv/linear weight (biases, norms excluded)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, PRUNABLE_TYPES))


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one example through the model's conv/linear layers (:func:`layer_flops`, summed)."""
    return int(sum(layer_flops(model, tuple(input_shape)).values()))


def count_parameters_without_gates(model: nn.Module) -> int:
    """Parameters of the network, the gates' own excluded (those of the modules plugged into its
    channel-group slots): what is left once the gates are folded away."""
    from .gates import get_gates

    gate_ids = {id(p) for g in get_gates(model).values() for p in g.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in gate_ids)


def nonzero_density(model: nn.Module) -> float:
    """Nonzero entries over all entries of the prunable weights (conv/linear, biases excluded): the density
    a mask applied to the weights leaves, read off the weights themselves."""
    from .masks import prunable_names

    params = dict(model.named_parameters())
    names = prunable_names(model)
    return sum(int((params[n] != 0).sum()) for n in names) / sum(params[n].numel() for n in names)
