"""Batch-norm statistics during training: a frozen batch norm keeps its statistics too.

``requires_grad_(False)`` stops a batch norm's affine weights, not its running mean and variance: in train mode
every forward still moves them towards the batch's statistics. A frozen part (``freeze``, ``frozen_encoder_stages``,
the parts a new target's training leaves) would then change after all, and with the small batches of a fine-tune
on a few images it changes fast. The loop calls :func:`hold_frozen_norm_statistics` before every training step
(validation may have put the model back in train mode as a whole), the convention of detectron2's and timm's frozen
batch norms, without replacing modules (so the saved weights keep their names and buffers).
"""

from __future__ import annotations

from torch import nn


def _batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [norm for norm in module.modules() if isinstance(norm, nn.modules.batchnorm._BatchNorm)]


def frozen_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch norms in ``module`` that have affine parameters and none of them trains."""
    return [norm for norm in _batch_norms(module)
            if (weights := list(norm.parameters())) and not any(p.requires_grad for p in weights)]


def hold_frozen_norm_statistics(module: nn.Module) -> None:
    """Put every frozen batch norm of ``module`` (:func:`frozen_norms`) in eval mode: it normalises with its running
    statistics and no longer updates them."""
    for norm in frozen_norms(module):
        norm.eval()


def freeze_norms(module: nn.Module) -> int:
    """Freeze every batch norm of ``module`` (affine weights and, through the loop, statistics); returns how many."""
    norms = _batch_norms(module)
    for norm in norms:
        norm.requires_grad_(False)
    return len(norms)


__all__ = ["freeze_norms", "frozen_norms", "hold_frozen_norm_statistics"]
