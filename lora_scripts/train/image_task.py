"""Image mode: Stable Diffusion LoRA (UNet attention, optional LoCon convs and text encoder) as a TrainingTask.

Owns the denoising loss (epsilon or v-prediction, min-SNR weighting, noise offset), the cached
latents and caption embeddings, sample images, and which weight files an image run writes.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lora_scripts.atomic import atomic_path
from lora_scripts.config import Config
from lora_scripts.train.task import RunInfo, enable_gradient_checkpointing, weight_dtype

if TYPE_CHECKING:
    from accelerate import Accelerator

    from lora_scripts.data.images import ImageExample
    from lora_scripts.model.stable_diffusion import SDComponents

SAMPLE_SEED = 1234


def released_after_caching(config: Config) -> frozenset[str]:
    """The frozen models (``vae``, ``text_encoder``) an image run frees once its items are cached.

    With latents cached, no training step runs the VAE; with caption embeddings cached too (a frozen
    text encoder), none runs the text encoder. Only samples would, so a run without
    ``validation_prompts`` drops them: on SD 1.5 in fp16 that is about 400 MB of GPU memory the
    training steps get back.
    """
    if config.mode != "image" or not config.cache_latents or config.validation_prompts:
        return frozenset()
    return frozenset({"vae"} if config.train_text_encoder else {"vae", "text_encoder"})


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a model's first (frozen) weight.

    Cheaper than diffusers' ``.device``/``.dtype``, which walk every submodule (about 0.8 ms each per
    step on the tiny mock UNet, a tenth of its whole training step).
    """
    weight = next(module.parameters())
    return weight.device, weight.dtype


class DenoisingLoss(torch.nn.Module):
    """``forward(batch)`` -> the diffusion training loss; holds the UNet (and text encoder) with LoRA."""

    def __init__(self, components: SDComponents, config: Config) -> None:
        super().__init__()
        self.unet = components.unet
        self.text_encoder = components.text_encoder
        self.vae = components.vae  # None (here and in components) once released_after_caching() freed it
        self.scheduler = components.noise_scheduler
        self.noise_offset = config.noise_offset
        self.min_snr_gamma = config.min_snr_gamma
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone(), persistent=False)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.to(*placement(self.vae))).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def encode_prompts(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(placement(self.text_encoder)[0]))[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device, dtype = placement(self.unet)
        if "latents" in batch:
            latents = batch["latents"].to(device)
        else:
            with torch.no_grad():
                latents = self.encode_pixels(batch["pixels"])
        latents = latents.float()
        if "embeddings" in batch:
            embeddings = batch["embeddings"].to(device)
        else:
            embeddings = self.encode_prompts(batch["input_ids"])
        noise = torch.randn_like(latents)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, device=device, dtype=latents.dtype
            )
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(noisy.to(dtype), timesteps, embeddings.to(dtype)).sample.float()
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = torch.nn.functional.mse_loss(prediction, target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            alpha_bar = self.alphas_cumprod.to(device)[timesteps]
            snr = alpha_bar / (1 - alpha_bar)
            weight = torch.clamp(snr, max=self.min_snr_gamma) / snr
            if self.scheduler.config.prediction_type == "v_prediction":
                weight = torch.clamp(snr, max=self.min_snr_gamma) / (snr + 1)
            loss = loss * weight
        return loss.mean()


class ImageTask:
    """Stable Diffusion LoRA training, per the TrainingTask protocol."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.examples: list[ImageExample] = []
        self.sizes: list[tuple[int, int]] = []
        self.items: list[dict[str, torch.Tensor]] = []
        self.components: SDComponents | None = None
        self._model: DenoisingLoss | None = None

    # -- data -------------------------------------------------------------------------------------
    def check_data(self) -> None:
        from lora_scripts.data.images import load_image_examples, target_sizes

        self.examples = load_image_examples(self.config)
        self.sizes = target_sizes(self.examples, self.config.resolution, self.config.bucket)

    def dataset(self) -> list[dict[str, torch.Tensor]]:
        return self.items

    def groups(self) -> list[list[int]]:
        """Indices by target size; an example from a kohya 'N_name' folder appears N times."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, (example, size) in enumerate(zip(self.examples, self.sizes, strict=True)):
            by_size.setdefault(size, []).extend([index] * example.repeats)
        return [by_size[size] for size in sorted(by_size)]

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    # -- model ------------------------------------------------------------------------------------
    def build(self, accelerator: Accelerator) -> None:
        from lora_scripts.export.diffusers_format import add_image_lora
        from lora_scripts.model.stable_diffusion import load_sd_components

        config = self.config
        dtype = weight_dtype(accelerator.mixed_precision)
        components = load_sd_components(config.base_model_location(), dtype=dtype)
        for module in (components.unet, components.vae, components.text_encoder):
            module.requires_grad_(False)
            module.to(accelerator.device)
        components.vae.eval()
        components.text_encoder.eval()
        add_image_lora(components.unet, components.text_encoder if config.train_text_encoder else None, config)
        for module in (components.unet, components.text_encoder):  # LoRA weights train in fp32
            for param in module.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        if config.init_lora_weights:
            from lora_scripts.export.kohya import apply_lora_weights, load_lora_file

            path = config.path("init_lora_weights")
            assert path is not None
            text_encoder = components.text_encoder if config.train_text_encoder else None
            apply_lora_weights(components.unet, text_encoder, load_lora_file(path), path)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(components.unet)
            if config.train_text_encoder:
                enable_gradient_checkpointing(components.text_encoder)
        self.components = components
        self._model = DenoisingLoss(components, config)
        self.items = self._prepare_items()
        for name in released_after_caching(config):
            setattr(components, name, None)
            setattr(self._model, name, None)
        gc.collect()  # the weights go now, before the optimizer and the first step allocate

    @property
    def model(self) -> DenoisingLoss:
        assert self._model is not None, "build() first"
        return self._model

    def _prepare_items(self) -> list[dict[str, torch.Tensor]]:
        """Per example: latents (cached) or pixels, and caption embeddings (cached) or token ids."""
        from lora_scripts.data.images import load_image

        assert self.components is not None
        tokenizer = self.components.tokenizer
        cache_text = self.config.cache_latents and not self.config.train_text_encoder
        embeddings: dict[str, torch.Tensor] = {}
        items = []
        with torch.no_grad():
            for example, size in zip(self.examples, self.sizes, strict=True):
                pixels = load_image(example.path, size)
                item: dict[str, torch.Tensor] = {}
                if self.config.cache_latents:
                    item["latents"] = (
                        self.model.vae.encode(pixels[None].to(self.model.vae.device, self.model.vae.dtype))
                        .latent_dist.mode()[0]
                        .float()
                        .cpu()
                        * self.model.vae.config.scaling_factor
                    )
                else:
                    item["pixels"] = pixels
                ids = tokenizer(
                    example.caption,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids[0]
                if cache_text:
                    if example.caption not in embeddings:
                        embeddings[example.caption] = self.model.encode_prompts(ids[None])[0].float().cpu()
                    item["embeddings"] = embeddings[example.caption]
                else:
                    item["input_ids"] = ids
                items.append(item)
        return items

    # -- weights ----------------------------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.nn.Module]:
        assert self.components is not None
        modules = {"unet": self.components.unet}
        if self.config.train_text_encoder:
            modules["text_encoder"] = self.components.text_encoder
        return modules

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.{name}": param.detach().cpu().clone()
            for prefix, module in self._trainable().items()
            for name, param in module.named_parameters()
            if param.requires_grad
        }

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for prefix, module in self._trainable().items():
                for name, param in module.named_parameters():
                    if param.requires_grad:
                        param.copy_(state[f"{prefix}.{name}"])

    def save_weights(self, out_dir: Path, info: RunInfo) -> list[Path]:
        from lora_scripts.export.diffusers_format import save_diffusers_lora
        from lora_scripts.export.kohya import save_kohya_lora
        from lora_scripts.export.metadata import dataset_dirs, dataset_fingerprint, kohya_metadata
        from lora_scripts.model.stable_diffusion import sd_version

        assert self.components is not None
        text_encoder = self.components.text_encoder if self.config.train_text_encoder else None
        data_dir = self.config.path("train_data_dir")
        assert data_dir is not None
        metadata = kohya_metadata(
            self.config,
            step=info.step,
            epoch=info.epoch + 1,  # RunInfo counts from 0, loss.csv and training_summary.json from 1
            num_epochs=info.total_epochs,
            base_model=self.config.base_model,
            dataset_fingerprint=dataset_fingerprint([(e.path, e.caption) for e in self.examples]),
            dataset_dirs=dataset_dirs(self.examples, data_dir),
            v2=sd_version(self.components.unet.config.cross_attention_dim) == 2,
            v_prediction=self.components.noise_scheduler.config.prediction_type == "v_prediction",
            extra={"ss_loss": f"{info.loss:.6g}" if info.loss is not None else ""},
        )
        return [
            save_diffusers_lora(out_dir, self.components.unet, text_encoder),
            save_kohya_lora(out_dir, self.components.unet, text_encoder, metadata),
        ]

    # -- samples ----------------------------------------------------------------------------------
    def sample(self, out_dir: Path, step: int) -> list[Path]:
        from lora_scripts.model.stable_diffusion import build_pipeline

        assert self.components is not None
        if not self.config.validation_prompts:
            return []
        pipe = build_pipeline(self.components)
        pipe.set_progress_bar_config(disable=True)
        written = []
        self.model.eval()
        try:
            for index, prompt in enumerate(self.config.validation_prompts):
                generator = torch.Generator(device="cpu").manual_seed(SAMPLE_SEED + index)
                with torch.no_grad():
                    image = pipe(
                        prompt,
                        num_inference_steps=self.config.sample_inference_steps,
                        height=self.config.resolution,
                        width=self.config.resolution,
                        generator=generator,
                    ).images[0]
                target = out_dir / f"step-{step:06d}-{index:02d}.png"
                with atomic_path(target) as tmp:
                    image.save(tmp, format="PNG")
                written.append(target)
        finally:
            self.model.train()
            self.model.vae.eval()
            if not self.config.train_text_encoder:
                self.model.text_encoder.eval()
        return written

    def eval_loss(self) -> float | None:
        return None
