"""Training the default model's own ControlNet, `shape` (issue 28).

`train_controlnet(out_dir, config)` builds a `diffusers.ControlNetModel` from the default
model's U-Net (`from_unet`: a copy of its encoder half, with "zero convolutions" on its outputs,
so that the untrained net changes nothing) whose control-image encoder
(`config.conditioning_channels`, two stride-2 steps) maps 64x64 pixels to the 16x16 latents.
It trains the net alone, the U-Net, text encoder and VAE frozen, on seeded synthetic triples
(`controlnet_data.pairs`: caption, picture and the silhouette of its shape) with the base
model's loss (`train.denoising_loss`): DDPM's epsilon-prediction loss on the frozen VAE's
latents (the posterior's mean) times its scaling factor, Min-SNR-gamma weighting and a share of
empty prompts; the U-Net predicts the noise with the net's residuals for each row's silhouette.
The latents are encoded once, before the first step.

The net is written as a diffusers folder (config.json and fp16
diffusion_pytorch_model.safetensors) that `pipeline.controlnet.load_controlnet` and diffusers'
`ControlNetModel.from_pretrained` read, with `training.json` beside it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from sdserve.shapes.controlnet_data import mask_of, pairs
from sdserve.shapes.controlnet_recipe import ControlNetTrainConfig
from sdserve.shapes.train import (
    Progress,
    _cosine_with_warmup,
    denoising_loss,
    encode,
    images_to_tensor,
    optimizer_step,
    token_ids,
)

logger = logging.getLogger(__name__)


def new_controlnet(unet, config: ControlNetTrainConfig):
    """The untrained net for `unet`: its encoder's weights, the zero convolutions on its outputs
    at zero, so that it changes nothing yet. The control encoder's last convolution, which
    diffusers also starts at zero, starts at random (PyTorch's default init): with two zero
    layers in a row the silhouette reaches neither's gradient, and 300 steps of
    `train-controlnet` left the net's images as they were without it (IoU 0.22 both)."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(config.conditioning_channels)
    )
    net.controlnet_cond_embedding.conv_out.reset_parameters()
    return net


def silhouette_batch(masks: torch.Tensor) -> torch.Tensor:
    """(n, size, size) bool silhouettes as control images, (n, 3, size, size) float32 in [0, 1]
    (white on black, as `pipeline.controlnet.prepare_image` gives them)."""
    return masks.to(torch.float32).unsqueeze(1).expand(-1, 3, -1, -1)


def training_data(vae, config: ControlNetTrainConfig, progress: Progress | None = None,
                  batch: int = 512) -> tuple[torch.Tensor, torch.Tensor, list[str]]:  # fmt: skip
    """The scaled latents (n, 4, 16, 16), silhouettes (n, 64, 64) bool and prompts of
    `config.samples` seeded triples, encoded by the frozen VAE a batch at a time."""
    triples = pairs(config.samples, config.seed, config.size)
    chunks = [triples[i : i + batch] for i in range(0, len(triples), batch)]
    latents = []
    for n, chunk in enumerate(chunks, 1):
        latents.append(encode(vae, images_to_tensor(image for _, image, _ in chunk)))
        if progress:
            progress("latents", n, len(chunks), 0.0)
    masks = torch.from_numpy(np.stack([mask_of(s) for _, _, s in triples]))
    scaled = torch.cat(latents) * vae.config.scaling_factor
    return scaled, masks, [caption.prompt for caption, _, _ in triples]


def controlled_unet(unet, net, masks: torch.Tensor):
    """`predict(noisy, t, cond, idx)` for `train.denoising_loss`: the U-Net's noise prediction
    with the net's residuals for the silhouettes of rows `idx`."""

    def predict(noisy, t, cond, idx):
        image = silhouette_batch(masks[idx])
        down, mid = net(noisy, t, encoder_hidden_states=cond, controlnet_cond=image,
                        return_dict=False)  # fmt: skip
        return unet(noisy, t, cond, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample  # fmt: skip

    return predict


def train_net(pipe, net, latents: torch.Tensor, masks: torch.Tensor, prompts: list[str],
              config: ControlNetTrainConfig, progress: Progress | None = None) -> dict:  # fmt: skip
    """The training loop; stops early on Ctrl-C (KeyboardInterrupt), keeping what was trained.
    Returns {"steps_done", "interrupted", "loss"} (the mean of the last 50 steps' losses)."""
    from diffusers import DDPMScheduler

    rng = random.Random(config.seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids_of = token_ids(pipe.tokenizer, ["", *prompts])
    for part in (pipe.vae, pipe.unet, pipe.text_encoder):
        part.requires_grad_(False).eval()
    net.train()
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    schedule = _cosine_with_warmup(opt, config.warmup_steps, config.steps)
    predict = controlled_unet(pipe.unet, net, masks)
    losses: list[float] = []
    interrupted = False
    try:
        for step in range(1, config.steps + 1):
            loss = denoising_loss(pipe, noise_scheduler, latents, prompts, ids_of, rng, config,
                                  predict)  # fmt: skip
            optimizer_step(loss, params, opt, schedule)
            losses.append(loss.item())
            if progress:
                progress("controlnet", step, config.steps, losses[-1])
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("interrupted at step %d of %d: keeping what was trained", len(losses),
                       config.steps)  # fmt: skip
    net.eval()
    tail = losses[-50:]
    return {"steps_done": len(losses), "interrupted": interrupted,
            "loss": round(sum(tail) / len(tail), 5) if tail else None}  # fmt: skip


def train_controlnet(out_dir: str | Path, config: ControlNetTrainConfig,
                     model_dir: str | Path | None = None,
                     progress: Progress | None = None) -> dict:  # fmt: skip
    """Trains the net for the model in `model_dir` (default: the built-in default model), writes
    it to `out_dir` (fp16) with `training.json`, and returns that report. `progress`'s phases:
    "latents" (batches encoded) and "controlnet" (training steps)."""
    from diffusers import StableDiffusionPipeline

    from sdserve.constants import DEFAULT_MODEL_DIR

    out_dir = Path(out_dir)
    torch.set_flush_denormal(True)  # denormal gradients are many times slower on CPUs
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model_dir or DEFAULT_MODEL_DIR,
                                                   local_files_only=True, use_safetensors=True,
                                                   dtype=torch.float32)  # fmt: skip
    latents, masks, prompts = training_data(pipe.vae, config, progress)
    data_s = time.perf_counter() - started
    net = new_controlnet(pipe.unet, config)
    result = train_net(pipe, net, latents, masks, prompts, config, progress)
    train_s = time.perf_counter() - started - data_s
    net.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    report = {
        "config": asdict(config),
        **result,
        "data_seconds": round(data_s),
        "train_seconds": round(train_s),
        "seconds_per_step": round(train_s / max(result["steps_done"], 1), 3),
        "parameters": sum(p.numel() for p in net.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s after %d steps", out_dir, result["steps_done"])
    return report
