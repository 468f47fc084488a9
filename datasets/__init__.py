"""Readers of the preprocessed shards: WebDataset pipelines and the stage views (A, B, C)."""

import dwm.shared  # noqa: F401  (fixes the cv2-before-decord import order)

from .pipeline import DataPosition, TrainLoader, eval_batches, iter_tar_samples, worker_stream
from .views import (UINT8_TO_FLOAT, View, ViewA, ViewB, ViewC, batch_size_of, batch_to_device,
                    collate, make_view)

__all__ = [
    "DataPosition", "TrainLoader", "eval_batches", "iter_tar_samples", "worker_stream",
    "UINT8_TO_FLOAT", "View", "ViewA", "ViewB", "ViewC", "batch_size_of", "batch_to_device",
    "collate", "make_view",
]
