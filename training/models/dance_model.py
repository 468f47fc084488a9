"""DanceModel: the container of every trainable component, and the unit the stages train.

Components (each a diffusers ``ModelMixin``/``ConfigMixin``, any may be absent):
``m2p`` (M2PEncoder), ``pose_guider``, ``id_adapter``, ``reference_net``, ``unet``.
Stage A builds only ``m2p``; stages B and C build all. What trains is decided by the freeze
matrix in :mod:`dwm.training.freeze`, never here.

On disk (``save_pretrained``) it is a diffusers-style folder: one subfolder per component
(config.json + safetensors) and ``model_index.json`` naming each component's class.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from .. import freeze

COMPONENTS = ("m2p", "pose_guider", "id_adapter", "reference_net", "unet")
INDEX_NAME = "model_index.json"
# Only classes from these module prefixes may be named by a model_index.json (no arbitrary imports).
_ALLOWED_MODULES = ("dwm.training.models.", "diffusers")


class DanceModel(nn.Module):
    def __init__(self, **components: nn.Module | None):
        super().__init__()
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)} (known: {COMPONENTS})")
        for name in COMPONENTS:
            setattr(self, name, components.get(name))

    def components(self) -> dict[str, nn.Module]:
        return {n: getattr(self, n) for n in COMPONENTS if getattr(self, n) is not None}

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass instead of keeping them: each component's
        own diffusers checkpointing (res blocks, spatial transformer blocks), plus the denoising
        UNet's temporal transformer blocks, which diffusers' SVD checkpointing leaves out and
        which hold most of a stage-C step's activations (a full-size 512x896, T=24 step:
        about 74 GiB without them, 31 GiB with them; ``dwm bench estimate_memory=true``)."""
        for comp in self.components().values():
            if getattr(comp, "_supports_gradient_checkpointing", False):
                comp.enable_gradient_checkpointing()
        unet = self.components().get("unet")
        for module in unet.modules() if unet is not None else ():
            if (type(module).__name__ == "TemporalBasicTransformerBlock"
                    and not getattr(module, "_dwm_checkpointed", False)):
                # an instance-level forward keeps the parameter names (and checkpoints) unchanged
                module.forward = functools.partial(_checkpointed_forward, module.forward)
                module._dwm_checkpointed = True

    def set_training_stage(self, stage: str, cfg: Any) -> list[dict[str, Any]]:
        """Apply the freeze matrix for ``stage``; returns the optimiser param groups."""
        return freeze.apply_stage(self, stage, cfg)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        index = {}
        for name, module in self.components().items():
            module.save_pretrained(path / name, safe_serialization=True, **kwargs)
            index[name] = [type(module).__module__, type(module).__name__]
        (path / INDEX_NAME).write_text(json.dumps(index, indent=1, sort_keys=True))

    @classmethod
    def from_pretrained(cls, path: str | Path, components: tuple[str, ...] | None = None,
                        **kwargs: Any) -> DanceModel:
        path = Path(path)
        index_file = path / INDEX_NAME
        if not index_file.exists():
            raise FileNotFoundError(f"{index_file} not found: {path} is not a DanceModel folder")
        index = json.loads(index_file.read_text())
        kwargs.setdefault("use_safetensors", True)  # never fall back to a pickled .bin
        loaded = {}
        for name, (module_name, class_name) in index.items():
            if components is not None and name not in components:
                continue
            if name not in COMPONENTS or not module_name.startswith(_ALLOWED_MODULES):
                raise ValueError(f"{index_file}: refusing component {name}={module_name}.{class_name}")
            klass = getattr(importlib.import_module(module_name), class_name)
            loaded[name] = klass.from_pretrained(path / name, **kwargs)
        return cls(**loaded)


def _checkpointed_forward(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if torch.is_grad_enabled():  # non-reentrant: works with frozen inputs and keyword arguments
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)
