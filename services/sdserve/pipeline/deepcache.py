"""DeepCache (Ma et al., CVPR 2024) for one row of a step batch.

The U-Net's deep features change slowly from one step to the next. DeepCache runs the whole
U-Net every `cache_interval` steps and, in between, only a shallow branch on the deep features
cached at the row's last full step. How shallow is `levels`:

- 0: `conv_in`, the last layer (resnet, and attention if any) of the last up block, and the
  output convolution; the cached input is what that layer takes from the layers before it.
  This is the DeepCache package's `DeepCacheSDHelper` with `cache_branch_id=0`, the paper's
  setting for Stable Diffusion.
- k >= 1: the first k levels whole: `conv_in`, the first k down blocks (without the k-th one's
  downsampler), the last k up blocks, the output convolution; the cached input is what the
  k-th up block from the end takes from the deeper levels. That is the helper with
  `cache_branch_id = 3 (k - 1) + layers_per_block` (`package_branch_id`).

Every skipped module's output is the one of the last full step, as in the helper, but per row,
so that rows at different steps and with different intervals share a batch: `capture` records
each row's deep input during a full forward, and `shallow_forward` runs the branch for a batch
of rows, each on its own cached features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def package_branch_id(unet, levels: int) -> int:
    """The DeepCache package's `cache_branch_id` of the same branch."""
    return 0 if levels == 0 else 3 * (levels - 1) + unet.config.layers_per_block


def _last_layer(unet):
    """The last up block's final resnet and attention (None without cross-attention)."""
    block = unet.up_blocks[-1]
    attention = block.attentions[-1] if getattr(block, "attentions", None) else None
    return block.resnets[-1], attention


@contextlib.contextmanager
def capture(unet, levels: int = 0) -> Iterator[list[torch.Tensor]]:
    """During a full forward inside the block, records the deep input of the shallow branch
    (one tensor, a row per batch row): each row's cache for its shallow steps."""
    captured: list[torch.Tensor] = []
    if levels == 0:
        resnet, _ = _last_layer(unet)
        skip_channels = unet.conv_in.out_channels  # the last layer's skip input: conv_in's output

        def hook(module, args):
            joined = args[0]  # torch.cat([deep features, conv_in output], dim=1)
            captured.append(joined[:, : joined.shape[1] - skip_channels].clone())

        handle = resnet.register_forward_pre_hook(hook)
    else:

        def hook(module, args, kwargs):
            captured.append(kwargs["hidden_states"].clone())

        block = unet.up_blocks[-levels]
        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def _embed(unet, sample, timestep, context, added_cond_kwargs=None):
    """The time embedding as `UNet2DConditionModel.forward` makes it, with SDXL's added text
    and size embedding (`get_aug_embed`) when the U-Net takes one."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=context,
                                 added_cond_kwargs=added_cond_kwargs or {})  # fmt: skip
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(encoder_hidden_states=context,
                                                 added_cond_kwargs=added_cond_kwargs)  # fmt: skip
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    return sample, emb, context


def _down(unet, levels: int, hidden, emb, context) -> list[torch.Tensor]:
    """The skip connections of the first `levels` down blocks, as their forwards make them."""
    skips = [hidden]
    for i, block in enumerate(unet.down_blocks[:levels]):
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions, strict=True):
            hidden = resnet(hidden, emb)
            if attention is not None:
                hidden = attention(hidden, encoder_hidden_states=context, return_dict=False)[0]
            skips.append(hidden)
        if i < levels - 1 and block.downsamplers is not None:
            for downsampler in block.downsamplers:
                hidden = downsampler(hidden)
            skips.append(hidden)
    return skips


@torch.inference_mode()
def shallow_forward(
    unet,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    context: torch.Tensor,
    deep: torch.Tensor,
    levels: int = 0,
    added_cond_kwargs: dict | None = None,
) -> torch.Tensor:
    """The U-Net's output for rows whose deep features are cached (`deep`, one row per batch
    row), computing only the layers that DeepCache does not skip; SDXL's `added_cond_kwargs`
    (text_embeds, time_ids: a row per batch row) go into the time embedding."""
    sample, emb, context = _embed(unet, sample, timestep, context, added_cond_kwargs)
    hidden = unet.conv_in(sample)
    if levels == 0:
        resnet, attention = _last_layer(unet)
        hidden = resnet(torch.cat([deep, hidden], dim=1), emb)
        if attention is not None:
            hidden = attention(hidden, encoder_hidden_states=context, return_dict=False)[0]
    else:
        skips = _down(unet, levels, hidden, emb, context)
        hidden = deep
        for block in unet.up_blocks[-levels:]:
            n = len(block.resnets)
            skips, own = skips[:-n], tuple(skips[-n:])
            cross = getattr(block, "has_cross_attention", False)
            kwargs = {"encoder_hidden_states": context} if cross else {}
            hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=own, **kwargs)
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)
