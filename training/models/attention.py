"""Attention processors that tie the ReferenceNet and the ID adapter into the SVD UNet.

Three kinds of processor, installed by :func:`install_processors`:

- ``ReferenceWriter`` (ReferenceNet, spatial self-attention ``attn1``): records the block's
  normalised hidden states (the attention input) in a shared :class:`ReferenceBank`, then runs
  plain self-attention.
- ``ReferenceReader`` (denoising UNet, spatial ``attn1``): keys/values come from the frame's own
  tokens concatenated with the recorded reference tokens of the same layer (CHAMP / Animate
  Anyone "reference attention"). Samples whose appearance is dropped (classifier-free guidance)
  get plain self-attention instead (their own tokens stand in for the reference).
- ``FaceCrossAttnProcessor`` (denoising UNet, spatial ``attn2``): the context is
  ``[CLIP token(s), face tokens]``; the CLIP part goes through the layer's own ``to_k``/``to_v``,
  the face tokens through their own ``face_to_k``/``face_to_v`` (owned by the ID adapter, so they
  are saved with it), and the two attention outputs are summed (decoupled cross-attention).
- ``ContextOnlyProcessor`` (temporal ``attn2``): sees only the CLIP token(s); temporal layers read
  neither reference features nor face tokens, so SVD's temporal prior is left as it was.

The processors are plain objects, not modules: every weight they use is a parameter of the ID
adapter (or of the Attention module itself), which keeps the UNet's state dict identical to a
stock SVD UNet and makes ``save_pretrained``/``from_pretrained`` round trips exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

TEMPORAL_MARK = "temporal_transformer_blocks"


class ReferenceBank:
    """State shared by writers and readers for one forward pass.

    ``features[layer]``: (B, N, C) reference tokens per spatial self-attention layer.
    ``keep``: (B,) bool, False where the sample's appearance (reference) is dropped; None: keep.
    ``enabled``: readers ignore the bank when False (e.g. a UNet-only forward).
    ``read_layers``: layers whose reader used reference tokens since the last clear (diagnostics).
    """

    def __init__(self) -> None:
        self.features: dict[str, torch.Tensor] = {}
        self.keep: torch.Tensor | None = None
        self.enabled = False
        self.read_layers: list[str] = []

    def clear(self) -> None:
        self.features = {}
        self.keep = None
        self.enabled = False
        self.read_layers = []


def _check_supported(attn: Attention, hidden_states: torch.Tensor) -> None:
    if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
        raise NotImplementedError(
            "dwm attention processors support token-sequence attention without spatial/group norm "
            "(the SVD transformer blocks); got an unsupported Attention layout")


def _split_heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    b, n, inner = x.shape
    return x.view(b, n, attn.heads, inner // attn.heads).transpose(1, 2)


def _attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention on projected q/k/v (B, N, inner) -> (B, N, inner)."""
    q, k, v = _split_heads(attn, query), _split_heads(attn, key), _split_heads(attn, value)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d).to(query.dtype)


def _project_out(attn: Attention, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class ReferenceWriter:
    """Self-attention that also records its input tokens under ``layer`` in the bank."""

    def __init__(self, bank: ReferenceBank, layer: str):
        self.bank, self.layer = bank, layer

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **_: Any) -> torch.Tensor:
        _check_supported(attn, hidden_states)
        self.bank.features[self.layer] = hidden_states
        out = _attend(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                      attn.to_v(hidden_states))
        return _project_out(attn, out, hidden_states)


class ReferenceReader:
    """Spatial self-attention whose keys/values also cover the reference tokens of this layer.

    The UNet runs frames flattened into the batch (B*F); the reference is per video (B), so its
    tokens are repeated per frame.
    """

    def __init__(self, bank: ReferenceBank, layer: str):
        self.bank, self.layer = bank, layer

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **_: Any) -> torch.Tensor:
        _check_supported(attn, hidden_states)
        ref = self.bank.features.get(self.layer) if self.bank.enabled else None
        source = hidden_states
        if ref is not None:
            self.bank.read_layers.append(self.layer)
            bf = hidden_states.shape[0]
            if bf % ref.shape[0]:
                raise ValueError(f"{self.layer}: {bf} frames do not divide into {ref.shape[0]} "
                                 "reference samples")
            frames = bf // ref.shape[0]
            ref = ref.to(hidden_states.dtype).repeat_interleave(frames, dim=0)
            if self.bank.keep is not None and not bool(self.bank.keep.all()):
                # A dropped sample attends to [own tokens, own tokens]: every key appears twice,
                # so the softmax is exactly plain self-attention, and no mask is needed (a mask
                # would rule out the flash kernels).
                if ref.shape != hidden_states.shape:
                    raise ValueError(f"{self.layer}: reference tokens {tuple(ref.shape)} differ "
                                     f"from the frame's {tuple(hidden_states.shape)}")
                keep = self.bank.keep.to(hidden_states.device).repeat_interleave(frames)
                ref = torch.where(keep[:, None, None], ref, hidden_states)
            source = torch.cat([hidden_states, ref], dim=1)
        out = _attend(attn, attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source))
        return _project_out(attn, out, hidden_states)


class FaceCrossAttnProcessor:
    """Cross-attention over [context tokens, face tokens] with separate face key/value weights.

    ``face_kv`` is the ID adapter's :class:`~dwm.training.models.id_adapter.FaceKV` for this
    layer (a module owned and saved by the ID adapter).
    """

    def __init__(self, face_kv: torch.nn.Module, num_context_tokens: int = 1):
        self.face_kv = face_kv
        self.num_context_tokens = num_context_tokens

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **_: Any) -> torch.Tensor:
        _check_supported(attn, hidden_states)
        if encoder_hidden_states is None:
            raise ValueError("FaceCrossAttnProcessor needs encoder_hidden_states")
        context = encoder_hidden_states[:, : self.num_context_tokens]
        face = encoder_hidden_states[:, self.num_context_tokens:]
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.to_q(hidden_states)
        out = _attend(attn, query, attn.to_k(context), attn.to_v(context))
        if face.shape[1]:
            out = out + _attend(attn, query, self.face_kv.face_to_k(face),
                                self.face_kv.face_to_v(face))
        return _project_out(attn, out, hidden_states)


class ContextOnlyProcessor:
    """Standard attention that drops the face tokens from the context (temporal cross-attention)."""

    def __init__(self, num_context_tokens: int = 1):
        self.num_context_tokens = num_context_tokens
        self._inner = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **_: Any) -> torch.Tensor:
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states[:, : self.num_context_tokens]
        return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def layer_name(processor_name: str) -> str:
    """``down_blocks.0....attn1.processor`` -> ``down_blocks.0....attn1``."""
    return processor_name.removesuffix(".processor")


def is_temporal(processor_name: str) -> bool:
    return TEMPORAL_MARK in processor_name


def spatial_layers(unet: torch.nn.Module, kind: str) -> list[str]:
    """Names of the spatial ``attn1`` (self) or ``attn2`` (cross) layers of an SVD UNet."""
    return [layer_name(n) for n in unet.attn_processors
            if not is_temporal(n) and layer_name(n).endswith("." + kind)]


def layer_dims(unet: torch.nn.Module, layers: list[str]) -> list[int]:
    """The query width (inner dim) of each named attention layer."""
    modules = dict(unet.named_modules())
    return [modules[name].to_q.out_features for name in layers]


def install_processors(unet: torch.nn.Module, reference_net: torch.nn.Module | None,
                       id_adapter: torch.nn.Module | None, bank: ReferenceBank,
                       num_context_tokens: int = 1) -> None:
    """Put readers, face processors and context-only processors on the denoising UNet, writers on
    the ReferenceNet. Idempotent; processors hold no weights of their own."""
    face_index = {}
    if id_adapter is not None:
        face_index = {name: i for i, name in enumerate(id_adapter.config.face_layers)}
    procs: dict[str, Any] = {}
    for name in unet.attn_processors:
        layer = layer_name(name)
        if is_temporal(name):
            procs[name] = (ContextOnlyProcessor(num_context_tokens) if layer.endswith(".attn2")
                           else AttnProcessor2_0())
        elif layer.endswith(".attn1"):
            procs[name] = ReferenceReader(bank, layer)
        elif layer in face_index:
            procs[name] = FaceCrossAttnProcessor(id_adapter.face_kv[face_index[layer]],
                                                 num_context_tokens)
        else:
            procs[name] = ContextOnlyProcessor(num_context_tokens)
    unet.set_attn_processor(procs)
    if reference_net is not None:
        ref_procs = {}
        for name in reference_net.attn_processors:
            layer = layer_name(name)
            writer = not is_temporal(name) and layer.endswith(".attn1")
            ref_procs[name] = ReferenceWriter(bank, layer) if writer else AttnProcessor2_0()
        reference_net.set_attn_processor(ref_procs)
