"""EDM noise and preconditioning as SVD uses them, plus the Euler sampler for generation.

SVD (img2vid) is a v-prediction model in the EDM parameterisation with sigma_data = 1:

    c_skip = 1 / (sigma^2 + 1)      c_out = -sigma / sqrt(sigma^2 + 1)
    c_in   = 1 / sqrt(sigma^2 + 1)  c_noise = log(sigma) / 4
    denoised = c_skip * x + c_out * F(c_in * x, c_noise)

Training draws log(sigma) ~ N(P_mean, P_std^2) (0.7, 1.6, as SVD fine-tuners use) and weights
the squared error of ``denoised`` by (sigma^2 + 1) / sigma^2, which is 1 on F's own error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

P_MEAN = 0.7
P_STD = 1.6
SIGMA_MIN = 0.002  # SVD scheduler's range
SIGMA_MAX = 700.0
# SVD conditioning defaults (added_time_ids = [fps - 1, motion_bucket_id, noise_aug_strength])
DEFAULT_FPS = 7
DEFAULT_MOTION_BUCKET = 127
DEFAULT_NOISE_AUG = 0.02


def sample_sigmas(batch: int, p_mean: float = P_MEAN, p_std: float = P_STD,
                  generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch,) sigmas with log-normal distribution."""
    z = torch.randn(batch, generator=generator, device=generator.device if generator else "cpu")
    return (z * p_std + p_mean).exp().to(device)


def preconditioning(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise), each shaped like ``sigma``."""
    s2 = sigma ** 2
    c_skip = 1.0 / (s2 + 1.0)
    c_out = -sigma / (s2 + 1.0).sqrt()
    c_in = 1.0 / (s2 + 1.0).sqrt()
    c_noise = 0.25 * sigma.log()
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """EDM weight (sigma^2 + 1) / sigma^2 for the error of the denoised sample."""
    return (sigma ** 2 + 1.0) / sigma ** 2


def expand_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample (B,) tensor over the remaining dims of ``like``."""
    return x.reshape(x.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(latents: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return latents + noise * expand_to(sigma, latents)


def edm_denoise(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``denoised = c_skip x + c_out F(c_in x, c_noise)``; ``model_fn(scaled_input, c_noise)``."""
    c_skip, c_out, c_in, c_noise = preconditioning(sigma)
    out = model_fn(noisy * expand_to(c_in, noisy), c_noise)
    return noisy * expand_to(c_skip, noisy) + out * expand_to(c_out, out)


def added_time_ids(batch: int, fps: float = DEFAULT_FPS,
                   motion_bucket_id: float = DEFAULT_MOTION_BUCKET,
                   noise_aug_strength: float = DEFAULT_NOISE_AUG,
                   device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SVD's micro-conditioning ids (batch, 3); like the SVD pipeline, ``fps - 1`` is passed."""
    ids = torch.tensor([fps - 1, motion_bucket_id, noise_aug_strength], dtype=dtype, device=device)
    return ids[None].repeat(batch, 1)


def karras_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = 7.0) -> torch.Tensor:
    """``steps`` decreasing sigmas (Karras et al. 2022) followed by a final 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


@torch.no_grad()
def euler_sample(denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 noise: torch.Tensor, sigmas: torch.Tensor,
                 callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Euler ODE sampler (SVD's EulerDiscreteScheduler, deterministic).

    ``denoise_fn(x, sigma)`` returns the denoised estimate for a scalar ``sigma`` (0-d tensor);
    classifier-free guidance belongs inside it. ``noise`` is unit Gaussian; it is scaled by
    ``sigmas[0]``. ``sigmas`` ends with 0.
    """
    x = noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise_fn(x, sigma)
        derivative = (x - denoised) / sigma
        x = x + derivative * (sigma_next - sigma)
        if callback is not None:
            callback(i, x)
    return x
