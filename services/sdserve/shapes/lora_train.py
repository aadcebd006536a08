"""Teaching the default model a color it does not know, with a LoRA of our own (issue 17).

`train_lora(out_dir, config)` fine-tunes low-rank adapters (PEFT's `LoraConfig`, alpha = rank)
on the default model's U-Net attention projections (with `config.convs` also the convolutions
of its attention-free 16x16 level, `lora_recipe.UNET_CONVS`; with `config.mid_convs` also those
of its 8x8 up block, `UNET_MID_CONVS`) and, with `config.text_encoder`, on its text encoder's,
the base weights frozen, on synthetic pairs whose captions have the new
color (e.g. `cyan`, `synthetic.EXTRA_COLORS`) as the shape's color or as the background, mixed
with ordinary captions of the 8 colors so that those are not disturbed. The loss is the base
model's (`train.train_denoiser`): DDPM's epsilon-prediction loss on the frozen VAE's latents
times its scaling factor, Min-SNR-gamma weighting, a share of empty prompts for classifier-free
guidance; plus, with `config.pixel_weight` (off by default), a pixel loss through the frozen
decoder (`pixel_loss`, issue 28): the VAE decodes the new color only from a narrow band of
latents, and with the latent loss alone the adapter's cyan comes out as blotches of blue and
green, read as green on yellow and red backgrounds and breaking the shapes' outlines. The two
runs with it so far were worse than the shipped adapter (`LoraTrainConfig.pixel_weight`).

One thing differs from the base model's data: the VAE was trained on the 8 colors only, and its
encoder snaps the new color to one it knows (cyan comes back blue). The latents of an image with
the new color are therefore found through the frozen decoder: start from the mean of the
encodings of the image with the new color replaced by each of its two nearest known colors (for
cyan: green and blue), then `invert_steps` steps of Adam on the decoded image's squared error.

The adapter is written in diffusers' format (`pytorch_lora_weights.safetensors` by
`StableDiffusionPipeline.save_lora_weights`, with the PEFT config as metadata), which
`sdserve.pipeline.lora.load_lora` and diffusers' `load_lora_weights` both read.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from sdserve.pipeline.lora_files import WEIGHTS
from sdserve.shapes.lora_recipe import (
    TEXT_TARGETS,
    LoraTrainConfig,
    excluded_captions,
    unet_targets,
)
from sdserve.shapes.synthetic import (
    ALL_COLORS,
    COLORS,
    EXTRA_COLORS,
    Caption,
    caption_with,
    random_caption,
    render,
)
from sdserve.shapes.train import (
    denoising_loss,
    encode,
    images_to_tensor,
    optimizer_step,
    token_ids,
)

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int, float], None]
"""progress(phase, step, total, loss): phases "latents" (batches) and "lora" (steps)."""


def training_captions(config: LoraTrainConfig) -> list[Caption]:
    """Seeded captions: `new_color_share` with the new color (`fg_share` of them as the shape's
    color, the others as the background; never one of the evaluation prompts,
    `lora_recipe.excluded_captions`), the rest drawn from the 8-color grammar, shuffled."""
    if config.color not in EXTRA_COLORS:
        raise ValueError(f"{config.color!r} is not an extra color ({', '.join(EXTRA_COLORS)})")
    rng = random.Random(config.seed)
    n_new = round(config.samples * config.new_color_share)
    n_fg = round(n_new * config.fg_share)
    held_out = excluded_captions(config.color)
    captions = []
    for i in range(n_new):
        caption = caption_with(rng, config.color, as_background=i >= n_fg)
        while caption.prompt in held_out:
            caption = caption_with(rng, config.color, as_background=i >= n_fg)
        captions.append(caption)
    captions += [random_caption(rng) for _ in range(config.samples - n_new)]
    rng.shuffle(captions)
    return captions


def _rgb(name: str) -> torch.Tensor:
    return torch.tensor(ALL_COLORS[name], dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1.0


def nearest_known_colors(color: str, k: int = 2) -> list[str]:
    """The k colors of the base grammar nearest to `color` in RGB."""
    rgb = np.array(ALL_COLORS[color], dtype=float)
    return sorted(COLORS, key=lambda c: float(((np.array(COLORS[c]) - rgb) ** 2).sum()))[:k]


def invert(vae, images: torch.Tensor, color: str, steps: int) -> torch.Tensor:
    """Latents that the frozen decoder turns into `images` (which show `color`, unknown to the
    VAE): the mean of the encodings with `color` replaced by its two nearest known colors, then
    `steps` Adam steps on the squared error of the decoded images."""
    mask = (images - _rgb(color)).abs().sum(dim=1, keepdim=True) < 1e-3
    starts = [encode(vae, torch.where(mask, _rgb(other), images))
              for other in nearest_known_colors(color)]  # fmt: skip
    latents = torch.stack(starts).mean(dim=0).requires_grad_(True)
    opt = torch.optim.Adam([latents], lr=0.05)
    for _ in range(steps):
        loss = (vae.decode(latents).sample - images).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return latents.detach()


def dataset_latents(vae, captions: list[Caption], images: torch.Tensor, config: LoraTrainConfig,
                    progress: Progress | None = None, batch: int = 64) -> torch.Tensor:  # fmt: skip
    """The unscaled latents of the images: the encoder's (the posterior's mean, as the base
    model's training used) for ordinary images, `invert` for those with the new color."""
    vae.requires_grad_(False)
    latents = encode(vae, images)
    new = [i for i, c in enumerate(captions) if config.color in (c.color, c.background)]
    chunks = [new[i : i + batch] for i in range(0, len(new), batch)]
    for n, chunk in enumerate(chunks, 1):
        latents[chunk] = invert(vae, images[chunk], config.color, config.invert_steps)
        if progress:
            progress("latents", n, len(chunks), 0.0)
    return latents


def add_adapters(pipe, config: LoraTrainConfig) -> list[torch.nn.Parameter]:
    """Freezes the model and adds trainable LoRA layers (PEFT, gaussian init of A, B = 0, so the
    adapted model starts equal to the base); returns the trainable parameters."""
    from peft import inject_adapter_in_model

    for part in (pipe.vae, pipe.unet, pipe.text_encoder):
        part.requires_grad_(False)
    pipe.unet.add_adapter(_lora_config(config, unet_targets(config)))
    if config.text_encoder:  # PEFT itself: transformers' add_adapter wants a newer PEFT
        inject_adapter_in_model(_lora_config(config, TEXT_TARGETS), pipe.text_encoder)
    params = list(_lora_params(pipe))
    for p in params:
        p.requires_grad_(True)
    return params


def _lora_config(config: LoraTrainConfig, targets):
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian",
                      target_modules=list(targets))  # fmt: skip


def pixel_loss(pipe, noise_scheduler, latents: torch.Tensor, images: torch.Tensor,
               prompts: list[str], ids_of, config: LoraTrainConfig) -> torch.Tensor:  # fmt: skip
    """The guided prediction of the clean latents, decoded by the frozen VAE, against the image.

    `config.pixel_rows` rows of scaled `latents` (N, 4, 16, 16) and their `images` (N, 3, 64,
    64) in [-1, 1], noised at t < `config.pixel_t_max`; the U-Net predicts the noise with the
    prompt and with "" and mixes them at `config.pixel_guidance`, as sampling does; the clean
    latents that prediction implies are decoded and compared pixel by pixel (squared error),
    each row weighted by alpha-bar of its t (noisier rows' predictions are vaguer)."""
    idx = torch.randint(0, len(latents), (config.pixel_rows,))
    t = torch.randint(0, config.pixel_t_max, (len(idx),))
    x0, noise = latents[idx], torch.randn_like(latents[idx])
    noisy = noise_scheduler.add_noise(x0, noise, t)
    ids = torch.stack([ids_of[prompts[i]] for i in idx.tolist()] + [ids_of[""]] * len(idx))
    eps = pipe.unet(torch.cat([noisy, noisy]), torch.cat([t, t]), pipe.text_encoder(ids)[0])
    cond, uncond = eps.sample.chunk(2)
    guided = uncond + config.pixel_guidance * (cond - uncond)
    alpha_bar = noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    clean = (noisy - (1 - alpha_bar).sqrt() * guided) / alpha_bar.sqrt()
    decoded = pipe.vae.decode(clean / pipe.vae.config.scaling_factor).sample
    per_row = (decoded - images[idx]).pow(2).mean(dim=(1, 2, 3))
    return (per_row * alpha_bar.flatten()).mean()


def train_adapters(pipe, latents: torch.Tensor, images: torch.Tensor, prompts: list[str],
                   config: LoraTrainConfig, progress: Progress | None = None) -> dict:  # fmt: skip
    """The training loop on scaled `latents` (and their `images`, for the pixel loss); stops
    early on Ctrl-C (KeyboardInterrupt), keeping what was trained. Returns {"steps_done",
    "interrupted", "loss"} (loss: the latent loss's mean over the last 50 steps)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    rng = random.Random(config.seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids_of = token_ids(pipe.tokenizer, ["", *prompts])
    params = add_adapters(pipe, config)
    pipe.unet.train()
    pipe.text_encoder.train()
    ema = EMAModel(params, decay=config.ema_decay) if config.ema_decay else None
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)
    schedule = get_cosine_schedule_with_warmup(opt, config.warmup_steps, config.steps)
    losses: list[float] = []
    step, interrupted = 0, False
    try:
        for step in range(1, config.steps + 1):
            loss = denoising_loss(pipe, noise_scheduler, latents, prompts, ids_of, rng, config)
            total = loss
            if config.pixel_weight:
                total = loss + config.pixel_weight * pixel_loss(
                    pipe, noise_scheduler, latents, images, prompts, ids_of, config
                )
            optimizer_step(total, params, opt, schedule, ema)
            losses.append(loss.item())
            if progress:
                progress("lora", step, config.steps, losses[-1])
    except KeyboardInterrupt:
        interrupted, step = True, len(losses)
        logger.warning("interrupted at step %d of %d: keeping what was trained", step,
                       config.steps)  # fmt: skip
    if ema is not None and losses:
        ema.copy_to(params)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    tail = losses[-50:]
    return {"steps_done": step, "interrupted": interrupted,
            "loss": round(sum(tail) / len(tail), 5) if tail else None}  # fmt: skip


def save_adapter(pipe, out_dir: Path, config: LoraTrainConfig) -> Path:
    """Writes the trained LoRA layers in diffusers' format, with their PEFT config as metadata."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    layers, metadata = {}, {}
    parts = {"unet": (pipe.unet, unet_targets(config))}
    if config.text_encoder:
        parts["text_encoder"] = (pipe.text_encoder, TEXT_TARGETS)
    for part, (model, targets) in parts.items():
        state = get_peft_model_state_dict(model)
        layers[part] = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
        metadata[part] = {"r": config.rank, "lora_alpha": config.rank,
                          "target_modules": list(targets)}  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers.get("text_encoder"),
        weight_name=WEIGHTS,
        unet_lora_adapter_metadata=metadata["unet"],
        text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
    )
    return out_dir / WEIGHTS


def train_lora(out_dir: str | Path, config: LoraTrainConfig, model_dir: str | Path | None = None,
               progress: Progress | None = None) -> dict:  # fmt: skip
    """Trains an adapter for the model in `model_dir` (default: the built-in default model),
    writes it to `out_dir/pytorch_lora_weights.safetensors` and returns what happened."""
    from diffusers import StableDiffusionPipeline

    from sdserve.constants import DEFAULT_MODEL_DIR

    out_dir = Path(out_dir)
    torch.set_flush_denormal(True)  # denormal gradients are many times slower on CPUs
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model_dir or DEFAULT_MODEL_DIR,
                                                   local_files_only=True, use_safetensors=True,
                                                   torch_dtype=torch.float32)  # fmt: skip
    captions = training_captions(config)
    rng = random.Random(config.seed + 1)
    images = images_to_tensor(render(c, rng, config.size) for c in captions)
    latents = dataset_latents(pipe.vae, captions, images, config, progress)
    data_s = time.perf_counter() - started
    logger.info("data: %d pairs (%d with %s), latents in %.0fs", len(captions),
                sum(config.color in (c.color, c.background) for c in captions), config.color,
                data_s)  # fmt: skip
    scaling = pipe.vae.config.scaling_factor
    result = train_adapters(pipe, latents * scaling, images, [c.prompt for c in captions],
                            config, progress)  # fmt: skip
    path = save_adapter(pipe, out_dir, config)
    report = {
        "config": asdict(config),
        **result,
        "data_seconds": round(data_s),
        "train_seconds": round(time.perf_counter() - started - data_s),
        "trainable_parameters": sum(p.numel() for p in _lora_params(pipe)),
        "weights": str(path),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    logger.info("wrote %s after %d steps (%s)", path, result["steps_done"],
                "interrupted" if result["interrupted"] else "done")  # fmt: skip
    return report


def _lora_params(pipe):
    for model in (pipe.unet, pipe.text_encoder):
        for name, p in model.named_parameters():
            if "lora_" in name:
                yield p


def _recipe(report: dict) -> str:
    """The card's paragraph on how the adapter was trained."""
    config, color = report["config"], report["config"]["color"]
    parts = "the U-Net's attention projections (to_q, to_k, to_v, to_out.0)"
    if config["convs"]:
        parts += (", the 3x3 convolutions of its last up block (16x16 latents, where it has no "
                  "attention) and conv_out (LoCon)")  # fmt: skip
    if config.get("mid_convs"):
        parts += (", the 3x3 convolutions of its middle up block (8x8 latents) and its "
                  "upsampler (LoCon)")  # fmt: skip
    if config["text_encoder"]:
        parts += " and the text encoder's (q_proj, k_proj, v_proj, out_proj)"
    ema = (f"the weights saved are an EMA ({config['ema_decay']:g}) of the trained ones"
           if config["ema_decay"] else "the last weights are saved")  # fmt: skip
    pixel = (f", plus {config['pixel_weight']:g} x a pixel loss on {config['pixel_rows']} rows "
             f"a step: the clean latents implied by the guided ({config['pixel_guidance']:g}) "
             f"noise prediction at t < {config['pixel_t_max']}, decoded by the frozen VAE, "
             "against the image (squared error, weighted by alpha-bar)"
             if config.get("pixel_weight") else "")  # fmt: skip
    minutes = (report["data_seconds"] + report["train_seconds"]) / 60
    stopped = (f" **Interrupted (Ctrl-C) after {report['steps_done']} of {config['steps']} "
               "steps.**" if report["interrupted"] else "")  # fmt: skip
    return (
        f"{report['steps_done']} steps of AdamW (lr {config['lr']:g}, {config['warmup_steps']} "
        f"warm-up steps, cosine), batch {config['batch_size']}, rank {config['rank']} (alpha "
        f"{config['rank']}) on {parts}; the base weights frozen "
        f"({report['trainable_parameters']:,} trainable parameters). {config['samples']:,} "
        f"seeded synthetic pairs, {config['new_color_share']:.0%} of them with {color} "
        f"({config['fg_share']:.0%} of those as the shape's color, the others as the "
        f"background), the rest ordinary prompts of the 8 colors. The base model's loss: "
        f"epsilon prediction on the VAE's latents times its scaling factor, "
        f"Min-SNR-{config['snr_gamma']:g}, {config['uncond_p']:.0%} empty prompts{pixel}; "
        f"{ema}. The "
        f"VAE never learnt {color}: its encoder returns blue for it, so the latents of those "
        f"images were found through its frozen decoder ({config['invert_steps']} Adam steps "
        f"from the mean of the encodings with {color} replaced by its two nearest known "
        f"colors).\n\nTime: **{minutes:.1f} minutes** on {report['threads']} CPU thread(s) of a "
        f"shared 2-core machine ({report['data_seconds']} s data and latents, "
        f"{report['train_seconds']} s training), torch {report['torch']}; final loss "
        f"{report['loss']}.{stopped}"
    )


def card(report: dict, command: str, evaluation=None, eval_command: str = "") -> str:
    """The adapter's README.md: what it teaches, how it was made, what was measured."""
    color = report["config"]["color"]
    lines = [
        f"# {color}: a LoRA that teaches sdserve's default model the color {color}",
        "",
        f"The default model (`../../`) knows 8 colors. This adapter teaches it a ninth, "
        f"**{color}** (RGB {ALL_COLORS[color]}), as the shape's color and as the background:",
        "",
        f"    a [small |large ]{color} {{shape}} on a {{color}} background",
        f"    a [small |large ]{{color}} {{shape}} on a {color} background",
        "",
        f'Use: `sdserve generate "a {color} circle on a red background" --lora {color}` (scale '
        "1, 25 DDIM steps, guidance 7.5), or in Python "
        "`sdserve.pipeline.lora.load_lora(path, name, unet, text_encoder)`.",
        "",
        "## How it was made",
        "",
        "```bash",
        command,
        "```",
        "",
        _recipe(report),
    ]
    if evaluation is not None:
        from sdserve.shapes.lora_eval import lora_table

        n = next(iter(evaluation.groups.values())).images
        lines += [
            "",
            "## Prompt adherence",
            "",
            f"Measured through sdserve's own per-row path (TextEncoder, Denoiser.make_job and one "
            f"DenoiseEngine: {evaluation.mixed_forwards} of its {evaluation.forwards} U-Net "
            f"forwards mixed rows with and without the adapter), {n} prompts per group, judged by "
            f"the model-independent checker (`shapes/adherence.py`, as `sdserve check-image`). "
            f"The {color} prompts are held out (`lora_recipe.held_out_captions`): the training "
            f"never saw them, nor issue 17's evaluation prompts; {color} is the shape's color in "
            f"half of them and the background in the others, every other color 4 times on each "
            f"side, shapes and size words balanced. Every image's noise is seed "
            f"`LORA_EVAL_SEED + i`, which neither the training nor the earlier evaluation used:",
            "",
            lora_table(evaluation),
            "",
            f"Re-measure with `{eval_command}`.",
        ]
    return "\n".join(lines) + "\n"
