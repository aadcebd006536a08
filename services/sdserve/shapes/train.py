"""Training sdserve's default model on the synthetic shapes (issue 6).

`new_model(dir)` writes an untrained model in Stable Diffusion 1.x's layout at the sizes below
(`DEFAULT_*`): a CLIP text encoder with a word-level BPE tokenizer fitted to the captions'
grammar, a UNet2DConditionModel on 16x16x4 latents and an AutoencoderKL that downsamples 4x
(SD's downsamples 8x; at 64x64 pixels that would leave 8x8 latents, too coarse for sharp shapes).

`train(dir, config)` then trains it in two seeded phases on the CPU:
1. the VAE learns to reconstruct the renders (L1 + a small KL term); its latents' scaling
   factor is then measured (1 / their std), as Stable Diffusion's was;
2. the CLIP text encoder and the U-Net learn together to predict the noise that DDPM's forward
   process added to the frozen VAE's latents, conditioned on the prompt. 10% of prompts are
   replaced by "" so that classifier-free guidance works. The loss is weighted by Min-SNR-5
   (Hang et al. 2023), which converges several times faster than the plain loss, and the saved
   weights are an exponential moving average of the trained ones.

The result is a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads, with
fp16 safetensors weights.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from sdserve.pipeline.models import byte_level_vocab, save_sd_folder, sd_pipeline
from sdserve.shapes.recipe import TrainConfig
from sdserve.shapes.synthetic import COLORS, SHAPES, SIZE_WORDS, dataset

MODEL_NAME = "sdserve-shapes-64"

DEFAULT_TEXT_ENCODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_hidden_layers=3,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=64,
)
DEFAULT_UNET = dict(
    sample_size=16,  # 16x16 latents -> 64x64 pixels
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 128),
    # Cross-attention at 8x8 and 4x4 only: at 16x16 it would cost 3x the CPU time per step.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,  # see DEFAULT_VAE
)
DEFAULT_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    # Several channels per group: a group norm of one channel removes its spatial mean, and
    # with it the color of a plain background (SD's VAE has 4 to 16 channels per group).
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=1.0,  # measured after the VAE is trained
)


Progress = Callable[[str, int, int, float], None]
"""progress(phase, step, total, loss)."""


def grammar_words() -> list[str]:
    return ["a", "on", "background", *SHAPES, *COLORS, *SIZE_WORDS]


def write_word_tokenizer(out: Path) -> dict[str, int]:
    """A CLIP tokenizer whose BPE merges spell every word of the grammar as one token.

    The merges come from `tokenizers`' BPE trainer run on the grammar's words; every byte stays
    in the vocabulary, so any other text still tokenizes (a character at a time).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=1000, end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(grammar_words(), trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    vocab = byte_level_vocab()
    for token in sorted(state["vocab"], key=state["vocab"].get):
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer.save_pretrained(out)
    return {
        "vocab_size": len(vocab),
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }


def new_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Writes the untrained default model (the architecture above, seeded) to `out_dir`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        token_ids = write_word_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
    torch.manual_seed(seed)
    pipe = sd_pipeline(
        AutoencoderKL(**DEFAULT_VAE),
        CLIPTextModel(CLIPTextConfig(**DEFAULT_TEXT_ENCODER, **token_ids)),
        tokenizer,
        UNet2DConditionModel(**DEFAULT_UNET),
    )
    _save(pipe, out)
    return out


def _save(pipe, out: Path) -> None:
    save_sd_folder(pipe, out)
    name_configs(out)


def name_configs(model_dir: Path) -> None:
    """Replaces the folder paths diffusers records in `_name_or_path` by the model's name."""
    for path in [model_dir / "model_index.json", *model_dir.glob("*/config.json")]:
        config = json.loads(path.read_text())
        if "_name_or_path" in config:
            part = path.parent.name if path.parent != model_dir else ""
            config["_name_or_path"] = f"{MODEL_NAME}/{part}".rstrip("/")
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def images_to_tensor(images) -> torch.Tensor:
    """RGB PIL images as a (n, 3, size, size) batch in [-1, 1]."""
    import numpy as np

    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def _cosine_with_warmup(opt, warmup: int, total: int):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, warmup, total)


def train_vae(vae, images: torch.Tensor, config: TrainConfig, progress: Progress | None) -> None:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    schedule = _cosine_with_warmup(opt, min(config.warmup_steps, config.vae_steps // 10),
                                   config.vae_steps)  # fmt: skip
    for step in range(1, config.vae_steps + 1):
        batch = images[torch.randint(0, len(images), (config.vae_batch_size,))]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - batch).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if progress:
            progress("vae", step, config.vae_steps, loss.item())
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """The unscaled latents (the posterior's mean) of `images`."""
    return torch.cat(
        [vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)]
    )


def token_ids(tokenizer, texts) -> dict[str, torch.Tensor]:
    """Each text's input ids, padded to the tokenizer's length."""
    texts = sorted(set(texts))
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids  # fmt: skip
    return dict(zip(texts, ids, strict=True))


def denoising_loss(pipe, noise_scheduler, latents: torch.Tensor, prompts: list[str], ids_of,
                   rng: random.Random, config, predict=None) -> torch.Tensor:  # fmt: skip
    """One batch of DDPM's epsilon-prediction loss on scaled `latents`, Min-SNR-gamma weighted,
    with `config.uncond_p` of the prompts replaced by "" (classifier-free guidance). `config`:
    anything with batch_size, uncond_p and snr_gamma (the base model's and the adapters').
    `predict(noisy, t, cond, idx)`: the noise predicted for rows `idx` of `latents` (default:
    `pipe.unet`'s; a ControlNet's training adds its residuals for those rows)."""
    from diffusers.training_utils import compute_snr

    idx = torch.randint(0, len(latents), (config.batch_size,))
    texts = ["" if rng.random() < config.uncond_p else prompts[i] for i in idx.tolist()]
    cond = pipe.text_encoder(torch.stack([ids_of[t] for t in texts]))[0]
    x0 = latents[idx]
    noise = torch.randn_like(x0)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),))
    noisy = noise_scheduler.add_noise(x0, noise, t)
    eps = pipe.unet(noisy, t, cond).sample if predict is None else predict(noisy, t, cond, idx)
    per_sample = (eps - noise).pow(2).mean(dim=(1, 2, 3))
    snr = compute_snr(noise_scheduler, t)
    weight = torch.clamp(snr, max=config.snr_gamma) / snr  # Min-SNR-gamma, epsilon target
    return (per_sample * weight).mean()


def optimizer_step(loss: torch.Tensor, params, opt, schedule, ema=None) -> None:
    """Backward, gradient norm clipped at 1, AdamW and schedule steps, then the EMA's."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    schedule.step()
    if ema is not None:
        ema.step(params)


def train_denoiser(pipe, latents: torch.Tensor, prompts: list[str], config: TrainConfig,
                   progress: Progress | None) -> None:  # fmt: skip
    """Trains the text encoder and the U-Net on scaled `latents`, then leaves their EMA in them."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    rng = random.Random(config.seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids_of = token_ids(pipe.tokenizer, ["", *prompts])
    pipe.text_encoder.train()
    pipe.unet.train()
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    ema = EMAModel(params, decay=config.ema_decay)
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    schedule = _cosine_with_warmup(opt, config.warmup_steps, config.unet_steps)
    for step in range(1, config.unet_steps + 1):
        loss = denoising_loss(pipe, noise_scheduler, latents, prompts, ids_of, rng, config)
        optimizer_step(loss, params, opt, schedule, ema)
        if progress:
            progress("unet", step, config.unet_steps, loss.item())
    ema.copy_to(params)
    pipe.text_encoder.eval()
    pipe.unet.eval()


def train(model_dir: str | Path, config: TrainConfig, progress: Progress | None = None) -> dict:
    """Trains the model in `model_dir` (a folder `new_model` wrote) in place, saves it with fp16
    weights and returns what was measured on the way (also written to `training.json`)."""
    import time

    from diffusers import StableDiffusionPipeline

    model_dir = Path(model_dir)
    # Denormal floats (tiny gradients, Adam's second moments) are many times slower on CPUs.
    torch.set_flush_denormal(True)
    torch.manual_seed(config.seed)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True,
                                                   use_safetensors=True)  # fmt: skip
    pairs = dataset(config.samples, seed=config.seed, size=config.size)
    images = images_to_tensor(image for _, image in pairs)
    prompts = [caption.prompt for caption, _ in pairs]

    started = time.perf_counter()
    train_vae(pipe.vae, images, config, progress)
    latents = encode(pipe.vae, images)
    with torch.no_grad():
        recon = torch.cat([pipe.vae.decode(latents[i : i + 256]).sample
                           for i in range(0, min(len(latents), 1024), 256)])  # fmt: skip
    vae_l1 = float((recon.clamp(-1, 1) - images[: len(recon)]).abs().mean())
    scaling = float(1.0 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    vae_s = time.perf_counter() - started

    train_denoiser(pipe, latents * scaling, prompts, config, progress)
    report = {
        "config": asdict(config),
        "vae_reconstruction_l1": round(vae_l1, 4),
        "vae_scaling_factor": round(scaling, 5),
        "vae_seconds": round(vae_s),
        "denoiser_seconds": round(time.perf_counter() - started - vae_s),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    pipe.to(torch.float16)
    _save(pipe, model_dir)
    (model_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
