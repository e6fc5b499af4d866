"""The debug torchtitan Llama built in-process (no torchrun), shared by the component tests."""

from __future__ import annotations

import torch

from torchtitan_ext.config_registry import llama2_model
from torchtitan_ext.pc import PCConverter, attach_pc


def debug_model(pc: bool, degree: int = 5, n_layers: int = 6) -> torch.nn.Module:
    """The first ``n_layers`` layers of the debug Llama, on the CPU, initialised with seed 0 (PC attached)."""
    spec = llama2_model("debug", pc=PCConverter.Config(degree=degree) if pc else None)
    spec.model.layers = spec.model.layers[:n_layers]
    with torch.device("meta"):
        model = spec.model.build()
    attach_pc(model)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    return model


def build_optimizers(config, model: torch.nn.Module):
    """The optimizers container as torchtitan's ``Trainer`` makes it: ``config.build``, then the model spec's
    ``post_optimizer_build_fn`` (which attaches the model's ``pcopt.PCState``: refresh after every step)."""
    spec = llama2_model("debug", pc=PCConverter.Config())
    container = config.build(model_parts=[model])
    spec.post_optimizer_build_fn(container, [model], None)
    return container
