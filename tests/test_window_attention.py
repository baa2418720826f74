"""The window attention attends only the feature map's own tokens, the padded positions of an overhanging window
merged into one key (windows attended in groups of one shape): it must compute what TinyViT's plain form computes,
pad the map with zeros, attend every window in full, cut the padding away, for every kind of overhang, one bag or
one per image, forward and backward."""

from __future__ import annotations

import pytest
import torch

from esp_medsam_hf import EspMedSamConfig
from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam import (
    EspMedSamWindowAttention,
    GatheredBagBlock,
    ModalityController,
)

TOLERANCE = 1e-5  # float32, two orders of summation


def padded_window_attention(attn: EspMedSamWindowAttention, x: torch.Tensor, bag: GatheredBagBlock) -> torch.Tensor:
    """TinyViT's form, written out: zero-pad to whole windows, softmax attention over each full window and its
    bag's tokens, crop."""
    batch, height, width, channels = x.shape
    ws, heads = attn.window_size, attn.num_heads
    pad_b, pad_r = (ws - height % ws) % ws, (ws - width % ws) % ws
    padded = torch.nn.functional.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    nh, nw = (height + pad_b) // ws, (width + pad_r) // ws
    windows = padded.view(batch, nh, ws, nw, ws, channels).transpose(2, 3).reshape(-1, ws * ws, channels)
    q, k, v = (attn.qkv(attn.norm(windows)).view(windows.shape[0], ws * ws, heads, -1)
               .split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    logits = q @ k.transpose(-1, -2) * attn.scale + attn.attention_biases[:, attn.attention_bias_idxs]
    per_window = nh * nw
    tokens = bag.tokens.expand(batch, -1, -1, -1) if bag.shared else bag.tokens
    tokens = tokens.repeat_interleave(per_window, dim=0)
    token_bias = (bag.token_bias.expand(batch, -1) if bag.shared else bag.token_bias).repeat_interleave(per_window, 0)
    logits = torch.cat([logits, q @ tokens.transpose(-1, -2) * attn.scale + token_bias[:, None, None, :]], dim=-1)
    out = logits.softmax(-1) @ torch.cat([v, tokens], dim=2)
    out = attn.proj(out.transpose(1, 2).reshape(windows.shape[0], ws * ws, -1))
    out = out.view(batch, nh, nw, ws, ws, channels).transpose(2, 3).reshape(batch, nh * ws, nw * ws, channels)
    return out[:, :height, :width]


@pytest.fixture(scope="module")
def parts() -> tuple[EspMedSamWindowAttention, ModalityController]:
    torch.manual_seed(0)
    config = EspMedSamConfig.tiny(image_size=64)
    config._attn_implementation = "eager"
    dim, heads = config.aggregator_config.embed_dims[1], config.aggregator_config.num_heads[1]
    attn = EspMedSamWindowAttention(dim, heads, 5, config.aggregator_config)
    controller = ModalityController(config)
    with torch.no_grad():
        for param in (*attn.parameters(), *controller.parameters()):
            param.normal_(std=0.3)
    return attn, controller


@pytest.mark.parametrize("height, width", [(10, 10), (12, 10), (10, 13), (13, 12), (3, 4), (7, 3)])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("modalities", [[2, 2, 2], [0, 3, 1]])
def test_padded_windows_match_tinyvits_form(parts, height, width, implementation, modalities):
    attn, controller = parts
    attn.config._attn_implementation = implementation
    modality = torch.tensor(modalities)
    single = modalities[0] if len(set(modalities)) == 1 else None
    bag = controller.gather(1, modality, single)
    x = torch.randn(len(modalities), height, width, attn.qkv.in_features, requires_grad=True)
    ours = attn(x, bag)
    reference = padded_window_attention(attn, x, bag)
    assert ours.shape == x.shape
    assert (ours - reference).abs().max().item() < TOLERANCE
    weights = torch.randn_like(ours)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), x)
    assert (grad_ours - grad_reference).abs().max().item() < TOLERANCE


def test_attention_weights_are_those_of_tinyvits_padded_windows(parts):
    """Asked for its weights, the attention runs TinyViT's padded windows in full and returns one map per block in
    TinyViT's layout, the weights its output is computed from (gradients reach them), with the same output."""
    attn, controller = parts
    attn.config._attn_implementation = "eager"
    bag = controller.gather(1, torch.tensor([1]), 1)
    x = torch.randn(1, 7, 6, attn.qkv.in_features)  # windows of 5: the map padded to 10x10, 2x2 windows
    weights: list[torch.Tensor] = []
    out = attn(x, bag, weights)
    (map_,) = weights
    assert map_.shape == (4, attn.num_heads, 25, 25 + bag.tokens.shape[1])
    assert torch.allclose(map_.sum(-1), torch.ones(()), atol=TOLERANCE)
    assert (out - attn(x, bag)).abs().max().item() < TOLERANCE
    assert (out - padded_window_attention(attn, x, bag)).abs().max().item() < TOLERANCE
    map_.retain_grad()
    out.sum().backward()
    assert map_.grad is not None and map_.grad.abs().sum() > 0
