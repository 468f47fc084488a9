"""The integrated video model: SVD UNet + CHAMP ReferenceNet + pose guider + StableAnimator ID
adapter, driven by the M2PEncoder. Builds it, wires it, and runs one denoiser evaluation.

Wiring (:func:`install_wiring`, re-done after every load because hooks and processors are not
state):
- the pose guider's output is added to the UNet's sample right after ``conv_in`` (forward hook);
- spatial self-attention of the UNet reads the ReferenceNet's recorded tokens, spatial
  cross-attention sees ``[CLIP token, face tokens]`` with the ID adapter's face K/V, temporal
  attention sees the CLIP token only (see :mod:`dwm.training.models.attention`).

Conditioning of one denoiser call (:class:`Conditioning`), per sample:
- ``keep_pose`` False: the pose guidance is switched off (residual zero).
- ``keep_appearance`` False: the CLIP token, the concatenated reference latent, the face tokens
  and the reference attention are all dropped (zeros / masked), which is SVD's unconditional
  input. Classifier-free guidance at generation contrasts this with the full condition.

Latent conventions (those of the SVD pipeline): targets and the ReferenceNet's input are latents
times the VAE scaling factor (as the shards store them); the frame concatenated to the UNet's
input is the *unscaled* latent plus a little noise (``noise_aug_strength``, also passed in
``added_time_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dwm.shared import contract, pretrained

from .. import edm
from .attention import ReferenceBank, install_processors, layer_dims, spatial_layers
from .dance_model import DanceModel
from .id_adapter import IDAdapter
from .m2p import M2PEncoder
from .pose_guider import PoseGuider
from .reference_net import ReferenceNet

VIDEO_COMPONENTS = ("pose_guider", "id_adapter", "reference_net", "unet")
# scaled latents (shards, diffusion targets) = SVD VAE latent mean x this; SVD concatenates the
# unscaled latent to the UNet input
SVD_SCALING_FACTOR = 0.18215
# sigma at which the ReferenceNet sees the (clean) reference frame
REFERENCE_SIGMA = edm.SIGMA_MIN

# Sizes of the small trainable modules for each model size (the UNet's come from its config.json).
POSE_GUIDER_SIZES = {"full": (32, 64, 128), "tiny": (8, 16)}
ID_ADAPTER_SIZES = {  # inner_dim, depth, heads
    "full": dict(inner_dim=768, depth=2, heads=8),
    "tiny": dict(inner_dim=32, depth=1, heads=2),
}


# ---------------------------------------------------------------------------------------------
# wiring
# ---------------------------------------------------------------------------------------------
class Wiring:
    """Per-model runtime state shared by hooks and processors (never saved)."""

    def __init__(self) -> None:
        self.bank = ReferenceBank()
        self.pose_residual: torch.Tensor | None = None
        self.hook: Any = None

    def add_pose(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self.pose_residual is None:
            return output
        if self.pose_residual.shape != output.shape:
            raise ValueError(f"pose residual {tuple(self.pose_residual.shape)} does not match "
                             f"conv_in output {tuple(output.shape)}")
        return output + self.pose_residual.to(output.dtype)


def install_wiring(model: DanceModel, num_context_tokens: int = 1) -> Wiring:
    """Hook the pose guider into ``unet.conv_in`` and install the attention processors."""
    wiring = getattr(model, "_dwm_wiring", None)
    if wiring is None:
        wiring = Wiring()
        object.__setattr__(model, "_dwm_wiring", wiring)  # plain attribute, not a submodule
    if model.unet is None:
        return wiring
    if wiring.hook is not None:
        wiring.hook.remove()
    wiring.hook = model.unet.conv_in.register_forward_hook(wiring.add_pose)
    install_processors(model.unet, model.reference_net, model.id_adapter, wiring.bank,
                       num_context_tokens)
    return wiring


def get_wiring(model: DanceModel) -> Wiring:
    wiring = getattr(model, "_dwm_wiring", None)
    if wiring is None:
        raise RuntimeError("DanceModel is not wired: call animator.install_wiring(model) "
                           "(build_dance_model does) before running the video model")
    return wiring


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def build_video_components(unet: nn.Module, size: str = "full",
                           num_joints: int = contract.NUM_BODY_JOINTS,
                           face_tokens: int = 4) -> dict[str, nn.Module]:
    """Fresh pose guider, ID adapter and ReferenceNet that fit ``unet`` (which is kept)."""
    if size not in POSE_GUIDER_SIZES:
        raise ValueError(f"unknown model size {size!r} (full or tiny)")
    ucfg = unet.config
    cross_dim = ucfg.cross_attention_dim
    if not isinstance(cross_dim, int):
        cross_dim = int(cross_dim[0])
    pose_guider = PoseGuider(in_channels=num_joints, out_channels=ucfg.block_out_channels[0],
                             block_channels=POSE_GUIDER_SIZES[size])
    face_layers = spatial_layers(unet, "attn2")
    id_adapter = IDAdapter(embed_dim=contract.FACE_EMBED_DIM, num_tokens=face_tokens,
                           cross_attention_dim=cross_dim, face_layers=tuple(face_layers),
                           face_layer_dims=tuple(layer_dims(unet, face_layers)),
                           **ID_ADAPTER_SIZES[size])
    id_adapter.init_face_keys_from(unet)
    return {"pose_guider": pose_guider, "id_adapter": id_adapter,
            "reference_net": ReferenceNet.from_unet(unet), "unet": unet}


def _build_m2p(cfg: Any) -> nn.Module:
    """A fresh M2PEncoder exactly as stage A builds one (heatmap grid from the manifest)."""
    return M2PEncoder.from_train_config(cfg)


def build_dance_model(cfg: Any, stage: str, init_path: str | Path | None = None,
                      device: torch.device | str = "cpu") -> DanceModel:
    """The DanceModel for stage ``stage`` ("B" or "C"; "A" gives the M2PEncoder alone).

    ``init_path``: a DanceModel folder; components it lacks (e.g. the video model after stage A)
    are built fresh: the UNet from dwm.shared.pretrained (SVD weights, or the tiny profile's
    model), the ReferenceNet as a copy of it, pose guider and ID adapter at initialisation.
    """
    components: dict[str, nn.Module] = {}
    if init_path:
        components = DanceModel.from_pretrained(init_path).components()
    if "m2p" not in components:
        components["m2p"] = _build_m2p(cfg)
    if stage != "A":
        missing = [c for c in VIDEO_COMPONENTS if c not in components]
        if missing:
            if "unet" in components:
                raise ValueError(f"{init_path}: has a UNet but lacks {missing}; a DanceModel "
                                 "folder holds either no video model (after stage A) or all of it")
            components.update(build_video_components(pretrained.load_unet(cfg.models),
                                                     cfg.model_size,
                                                     face_tokens=cfg.face_tokens))
    model = DanceModel(**components).to(device)
    install_wiring(model)
    return model


def load_dance_model(path: str | Path, device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None) -> DanceModel:
    """A saved DanceModel (e.g. ``final/``), wired and in eval mode (generation, evaluation)."""
    model = DanceModel.from_pretrained(path).to(device)
    if dtype is not None:
        model = model.to(dtype)
    install_wiring(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# one denoiser evaluation
# ---------------------------------------------------------------------------------------------
@dataclass
class Conditioning:
    """What the video model is conditioned on (B samples, F frames)."""

    ref_latent: torch.Tensor  # (B, 4, h, w) reference frame latent, scaled (as in the shards)
    clip_embed: torch.Tensor  # (B, D) CLIP image embedding of the reference frame
    face_embed: torch.Tensor | None = None  # (B, 512) ArcFace embedding (None: no face tokens)
    pose: torch.Tensor | None = None  # (B, F, K, h, w) heatmaps in [0, 1]
    pose_scale: float | torch.Tensor = 1.0  # multiplies the pose guidance (scalar or (B,))
    keep_pose: torch.Tensor | None = None  # (B,) bool; None = keep
    keep_appearance: torch.Tensor | None = None  # (B,) bool; None = keep
    keep_face: torch.Tensor | None = None  # (B,) bool, e.g. face_valid; None = keep
    concat_latent: torch.Tensor | None = None  # (B, 4, h, w); None: ref_latent / scaling_factor
    scaling_factor: float = SVD_SCALING_FACTOR
    added_time_ids: torch.Tensor | None = None  # (B, 3); None: SVD defaults

    def batch(self) -> int:
        return int(self.ref_latent.shape[0])


def conditioning_latent(ref_latent: torch.Tensor, scaling_factor: float,
                        noise_aug_strength: float = edm.DEFAULT_NOISE_AUG,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """SVD's concatenated frame: the unscaled latent, noise-augmented. SVD adds the noise to the
    image before encoding; with cached latents it is added in latent space instead."""
    cond = ref_latent / scaling_factor
    if noise_aug_strength > 0:
        noise = torch.randn(cond.shape, generator=generator,
                            device=generator.device if generator else "cpu")
        cond = cond + noise_aug_strength * noise.to(cond.device, cond.dtype)
    return cond


def _mask(keep: torch.Tensor | None, b: int, device: torch.device) -> torch.Tensor:
    if keep is None:
        return torch.ones(b, dtype=torch.bool, device=device)
    return keep.to(device=device, dtype=torch.bool).reshape(b)


def _per_sample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.dtype).reshape(x.shape[0], *([1] * (like.ndim - 1)))


def model_output(model: DanceModel, scaled_input: torch.Tensor, c_noise: torch.Tensor,
                 cond: Conditioning) -> torch.Tensor:
    """F(c_in x, c_noise): the raw UNet output for (B, F, 4, h, w) inputs, all conditions on."""
    wiring = get_wiring(model)
    unet = model.unet
    b, f = scaled_input.shape[:2]
    device, dtype = scaled_input.device, scaled_input.dtype
    if cond.batch() != b:
        raise ValueError(f"conditioning has {cond.batch()} samples, input has {b}")
    keep_app = _mask(cond.keep_appearance, b, device)
    keep_pose = _mask(cond.keep_pose, b, device)
    keep_face = _mask(cond.keep_face, b, device) & keep_app

    concat = cond.concat_latent if cond.concat_latent is not None \
        else cond.ref_latent / cond.scaling_factor
    concat = concat.to(dtype) * _per_sample(keep_app, concat)
    clip = cond.clip_embed.to(dtype).reshape(b, 1, -1)
    clip = clip * _per_sample(keep_app, clip)
    context = clip
    if model.id_adapter is not None and cond.face_embed is not None:
        tokens = model.id_adapter(cond.face_embed.to(dtype))
        # zero tokens give zero face keys/values (no bias), so the face branch adds nothing
        context = torch.cat([clip, tokens * _per_sample(keep_face, tokens)], dim=1)
    time_ids = cond.added_time_ids
    if time_ids is None:
        time_ids = edm.added_time_ids(b, device=device, dtype=dtype)
    time_ids = time_ids.to(device, dtype)

    bank = wiring.bank
    bank.clear()  # state of the previous call stays until here (gradient checkpointing re-runs)
    if model.reference_net is not None:
        _, _, c_in_ref, c_noise_ref = edm.preconditioning(
            torch.full((b,), REFERENCE_SIGMA, device=device, dtype=dtype))
        ref_input = torch.cat([cond.ref_latent.to(dtype) * _per_sample(c_in_ref, cond.ref_latent),
                               concat], dim=1)
        model.reference_net.write_reference(ref_input, c_noise_ref, clip, time_ids)
        bank.enabled, bank.keep = True, keep_app

    wiring.pose_residual = None
    if model.pose_guider is not None and cond.pose is not None:
        pose = cond.pose.to(dtype)
        if pose.shape[:2] != (b, f):
            raise ValueError(f"pose is {tuple(pose.shape)}, expected ({b}, {f}, K, h, w)")
        scale = torch.as_tensor(cond.pose_scale, device=device, dtype=dtype).expand(b)
        scale = scale * keep_pose.to(dtype)
        residual = model.pose_guider(pose.flatten(0, 1))
        wiring.pose_residual = residual * scale.repeat_interleave(f)[:, None, None, None]
    try:
        unet_input = torch.cat([scaled_input, concat[:, None].expand(-1, f, -1, -1, -1)], dim=2)
        return unet(unet_input, c_noise.to(dtype), encoder_hidden_states=context,
                    added_time_ids=time_ids, return_dict=False)[0]
    finally:
        wiring.pose_residual = None  # conv_in is never re-run by checkpointing


def denoise(model: DanceModel, noisy: torch.Tensor, sigma: torch.Tensor,
            cond: Conditioning) -> torch.Tensor:
    """EDM denoiser D(x; sigma) for (B, F, 4, h, w) noisy latents and (B,) sigmas."""
    return edm.edm_denoise(lambda x, c_noise: model_output(model, x, c_noise, cond), noisy, sigma)
