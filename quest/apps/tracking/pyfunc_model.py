"""An MLflow pyfunc wrapper around a saved quest model file: raw uint8 images in, probabilities out.

The class is pickled by reference (module path), so the `quest` package must be importable where the
model is loaded: registry.py logs it with ``code_paths=[<quest package>]`` so that it travels with
the model and a fresh process needs only torch, torchvision, numpy and mlflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

# The artifact key under which registry.py stores the model file (models/.../<name>.pt).
MODEL_FILE_ARTIFACT = "model_file"
# Images per forward pass: bounds memory for large batches without changing the result.
CHUNK = 256


class QuestImageClassifier(mlflow.pyfunc.PythonModel):
    """Class probabilities for a batch of raw images (N x H x W x C, uint8 0..255, RGB)."""

    def load_context(self, context: Any) -> None:
        """Rebuild the network from the logged model file and keep its normalisation stats."""
        import torch

        from quest.core.checkpoint import load_model_file

        path = Path(context.artifacts[MODEL_FILE_ARTIFACT])
        model, meta = load_model_file(path, "logged model")
        self.model = model.eval()
        self.classes = list(meta.get("classes") or [])
        channels = len(meta["mean"])
        self.mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, channels, 1, 1)
        self.std = torch.tensor(meta["std"], dtype=torch.float32).view(1, channels, 1, 1)

    # np.ndarray is the hint MLflow accepts without deriving a schema from it (the explicit tensor
    # signature logged with the model applies); no hint at all makes it warn on every import
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """Softmax probabilities, float32 N x num_classes, rows summing to 1."""
        import torch

        x = _as_image_batch(model_input)
        if x.shape[-1] != self.mean.shape[1]:
            raise ValueError(
                f"expected images with {self.mean.shape[1]} channels last (N x H x W x C), "
                f"got shape {tuple(x.shape)}"
            )
        out = []
        with torch.no_grad():
            for start in range(0, x.shape[0], CHUNK):
                # uint8 NHWC -> float NCHW in [0, 1], normalised exactly as in training
                batch = torch.from_numpy(x[start : start + CHUNK]).permute(0, 3, 1, 2).float()
                batch = (batch / 255.0 - self.mean) / self.std
                out.append(torch.softmax(self.model(batch), dim=1).numpy())
        return np.concatenate(out).astype(np.float32)


def _as_image_batch(model_input: Any) -> np.ndarray:
    """The input as a contiguous uint8 N x H x W x C array (a single H x W x C image is batched)."""
    if isinstance(model_input, dict) and len(model_input) == 1:  # one named tensor
        model_input = next(iter(model_input.values()))
    if hasattr(model_input, "to_numpy"):  # a DataFrame from a serving layer
        model_input = np.stack([np.asarray(v) for v in model_input.iloc[:, 0]])
    x = np.asarray(model_input)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images N x H x W x C, got shape {x.shape}")
    if x.dtype != np.uint8:
        # accept integer-valued inputs from JSON serving (they arrive as int64/float64)
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)
