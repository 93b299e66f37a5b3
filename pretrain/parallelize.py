"""Plans applied to a built LanguageModel from the outside (torchtitan style): the model file stays
single-device code. Today: activation checkpointing per block. Tensor and sequence parallelism
plans are added here as they land in parallel/.
"""
from __future__ import annotations

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's forward in backward instead of keeping its activations.

    The block's forward is wrapped in place (no wrapper module), so parameter names, checkpoints
    and exports are the same with and without it.
    """
    for block in model.blocks:
        if getattr(block, "activation_checkpointing", False):
            continue
        inner = block.forward

        def forward(x, doc_start=None, _inner=inner, _block=block):
            if not (_block.training and x.requires_grad):
                return _inner(x, doc_start)
            return checkpoint(_inner, x, doc_start, use_reentrant=False)

        block.forward = forward
        block.activation_checkpointing = True
    return model
