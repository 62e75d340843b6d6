"""The denoising loss with Min-SNR-gamma weighting (Hang et al. 2023), for epsilon and v-prediction."""

from __future__ import annotations

import torch


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, shape (b,)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Per-sample loss weights.

    epsilon target: min(SNR, gamma) / SNR
    v target:       min(SNR, gamma) / (SNR + 1)   (the v loss is (SNR + 1) times the x0 loss, the eps loss SNR times)
    """
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    raise ValueError(f"prediction_type={prediction_type!r}: Min-SNR weighting supports epsilon and v_prediction")


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    min_snr_gamma: float | None,
) -> torch.Tensor:
    """Mean over samples of the (weighted) per-sample MSE, computed in fp32."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (b,)
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(alphas_cumprod, timesteps, min_snr_gamma, prediction_type)
    return per_sample.mean()
