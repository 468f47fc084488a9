"""Fixtures for pretrained components: the tiny profile's models and stand-in ONNX files.

``tiny_models_cfg`` is used by every area's tests: a ModelsConfig(profile="tiny") whose tiny
models are built once per session. Do not mutate it; use ``dataclasses.replace`` for variants.
"""

from __future__ import annotations

import pytest

__all__ = ["tiny_models_cfg", "tiny_models_root"]


@pytest.fixture(scope="session")
def tiny_models_cfg(tmp_path_factory):
    from dwm.shared.config import ModelsConfig
    from dwm.shared.tiny import build_tiny

    models_dir = tmp_path_factory.mktemp("models")
    cfg = ModelsConfig(profile="tiny", models_dir=str(models_dir))
    build_tiny(cfg.models_dir)
    return cfg


@pytest.fixture(scope="session")
def tiny_models_root(tiny_models_cfg):
    """``<models_dir>/tiny``: vae/, image_encoder/, unet/, dwpose/, insightface/models/<pack>/."""
    from dwm.shared.tiny import build_tiny

    return build_tiny(tiny_models_cfg.models_dir)
