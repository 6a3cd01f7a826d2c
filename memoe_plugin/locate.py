"""Where the bypass goes: the projection ``module_template`` names at ``layer``, and the block the key scope reads."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .hparams import MEMoEHyperParams
from .layer import projection_shape


def resolve_module(model: nn.Module, hparams: MEMoEHyperParams) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute name, module) of ``hparams.module_name``, with clear errors."""
    layers_path = hparams.module_template.split("{}")[0].rstrip(".")
    num_layers = _count_layers(model, layers_path)
    if num_layers is not None and not 0 <= hparams.layer < num_layers:
        raise ValueError(f"layer = {hparams.layer} is out of range: {layers_path} has {num_layers} layers "
                         f"(valid: 0..{num_layers - 1}). Set layer in the hparams file.")
    name = hparams.module_name
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"module_template {hparams.module_template!r} gives {name!r}, which is not a module of "
            f"{type(model).__name__}. Check the template against print(model); for Llama-style models it is "
            f"model.layers.{{}}.mlp.down_proj, for GPT-2 transformer.h.{{}}.mlp.c_proj.") from None
    projection_shape(module)   # TypeError when it is not a projection we can wrap
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, attr, module


def scope_block(model: nn.Module, hparams: MEMoEHyperParams) -> nn.Module:
    """The block whose input the key scope reads (``scope_layer``), from the layer list of ``module_template``."""
    layers_path = hparams.module_template.split("{}")[0].rstrip(".")
    try:
        layers = model.get_submodule(layers_path)
        return layers[hparams.scope_layer]
    except (AttributeError, IndexError, TypeError):
        raise ValueError(f"scope_layer = {hparams.scope_layer}: {layers_path!r} has no block {hparams.scope_layer} in "
                         f"{type(model).__name__}; set scope_layer to a block index, or -1 to read the bypass "
                         "input") from None


def _count_layers(model: nn.Module, layers_path: str) -> Optional[int]:
    try:
        layers = model.get_submodule(layers_path)
    except AttributeError:
        return None
    return len(layers) if isinstance(layers, (nn.ModuleList, nn.Sequential)) else None
