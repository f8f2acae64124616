"""The image loss: min-SNR weighting (epsilon and v-prediction) and the noise offset, against their definitions."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest
import torch

from lora_scripts.config import Config
from lora_scripts.model.stable_diffusion import load_sd_components
from lora_scripts.train.image_task import DenoisingLoss


class ZeroUNet(torch.nn.Module):
    """Predicts zeros and records what it was given: the loss is then the mean square of the target."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, _context: torch.Tensor) -> types.SimpleNamespace:
        self.calls.append((noisy, timesteps))
        return types.SimpleNamespace(sample=torch.zeros_like(noisy))


def loss_of(mock_sd: Path, prediction_type: str, batch: int = 1, **values: object) -> tuple[float, DenoisingLoss]:
    components = load_sd_components(str(mock_sd))
    scheduler = type(components.noise_scheduler).from_config(
        {**components.noise_scheduler.config, "prediction_type": prediction_type}
    )
    components = dataclasses.replace(components, unet=ZeroUNet(), noise_scheduler=scheduler)
    config = Config({"train_data_dir": "d", "base_model": str(mock_sd), "output_dir": "o", **values}, Path("c.yaml"))
    model = DenoisingLoss(components, config)
    inputs = {"latents": torch.ones(batch, 4, 8, 8) * 0.5, "embeddings": torch.zeros(batch, 77, 32)}
    torch.manual_seed(0)
    return float(model(inputs)), model


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_is_the_noise_or_the_velocity(mock_sd: Path, prediction_type: str) -> None:
    loss, model = loss_of(mock_sd, prediction_type, batch=4)
    ((noisy, timesteps),) = model.unet.calls
    alpha_bar = model.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    latents = torch.full_like(noisy, 0.5)
    noise = (noisy - alpha_bar.sqrt() * latents) / (1 - alpha_bar).sqrt()
    # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 (Salimans & Ho 2022); a zero prediction leaves target^2.
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    target = velocity if prediction_type == "v_prediction" else noise
    assert loss == pytest.approx(float((target**2).mean()), rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_is_the_clamped_snr_over_its_denominator(mock_sd: Path, prediction_type: str) -> None:
    plain, model = loss_of(mock_sd, prediction_type)
    weighted, _ = loss_of(mock_sd, prediction_type, min_snr_gamma=5.0)  # same seed: same noise and timestep
    ((_, timesteps),) = model.unet.calls
    alpha_bar = model.scheduler.alphas_cumprod[timesteps].item()
    snr = alpha_bar / (1 - alpha_bar)
    denominator = snr + 1 if prediction_type == "v_prediction" else snr  # Min-SNR-gamma (Hang et al. 2023)
    assert weighted == pytest.approx(plain * min(snr, 5.0) / denominator, rel=1e-5)


def test_noise_offset_shifts_each_channel_of_the_noise(mock_sd: Path) -> None:
    plain, _ = loss_of(mock_sd, "epsilon", batch=16)
    shifted, offset_model = loss_of(mock_sd, "epsilon", batch=16, noise_offset=2.0)
    # The target is N(0, 1) noise plus 2 x N(0, 1) per image and channel: mean square about 1 + 4.
    assert plain == pytest.approx(1.0, abs=0.2) and shifted == pytest.approx(5.0, rel=0.35)
    ((noisy, timesteps),) = offset_model.unet.calls
    alpha_bar = offset_model.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noise = (noisy - alpha_bar**0.5 * 0.5) / (1 - alpha_bar) ** 0.5  # what was added to the latents
    assert noise.mean(dim=(2, 3)).std() > 1.0  # a constant per image and channel, on top of ...
    assert noise.std(dim=(2, 3)).mean() == pytest.approx(1.0, abs=0.2)  # ... noise that varies like N(0, 1)
