"""An MLflow pyfunc wrapper around a saved quest model file: images in, probabilities out.

Two inputs: a uint8 N x H x W x C array (what the logged tensor signature describes), or encoded
images (JPEG/PNG/... bytes or base64 strings, any size and mode), which `predict_encoded`
decodes, converts, resizes and center-crops to the model's input the way evaluation does. A
malformed input raises a ValueError naming the expected input (a server answers it with 400).

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
# What the errors name: the inputs this model takes.
EXPECTED = ("expected uint8 images N x H x W x C (integers 0..255, channels last), or encoded "
            "JPEG/PNG images as base64 strings")


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
        config = dict(getattr(context, "model_config", None) or {})
        size = config.get("image_size") or [32, 32]
        self.image_size = (int(size[0]), int(size[1]))
        self.crop_ratio = float(config.get("crop_ratio") or 1.0)
        self.channels = channels

    # np.ndarray is the hint MLflow accepts without deriving a schema from it (the explicit tensor
    # signature logged with the model applies); no hint at all makes it warn on every import
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """Softmax probabilities, float32 N x num_classes, rows summing to 1."""

        x = _as_image_batch(model_input)
        if x.shape[-1] != self.mean.shape[1]:
            raise ValueError(f"{EXPECTED}: the model takes {self.mean.shape[1]} channels, got "
                             f"images of shape {tuple(x.shape[1:])}")
        if self.image_size and tuple(x.shape[1:3]) != self.image_size:
            raise ValueError(f"{EXPECTED}: uint8 arrays must be {self.image_size[0]} x "
                             f"{self.image_size[1]} (send other sizes encoded), got "
                             f"{tuple(x.shape[1:3])}")
        return self.probabilities(x)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities of a checked uint8 N x H x W x C batch."""
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, x.shape[0], CHUNK):
                # uint8 NHWC -> float NCHW in [0, 1], normalised exactly as in training
                batch = torch.from_numpy(x[start : start + CHUNK]).permute(0, 3, 1, 2).float()
                batch = (batch / 255.0 - self.mean) / self.std
                out.append(torch.softmax(self.model(batch), dim=1).numpy())
        return np.concatenate(out).astype(np.float32)

    def decode(self, images: list[Any]) -> np.ndarray:
        """Encoded images (bytes or base64 strings) as a uint8 N x H x W x C batch of the model's
        input size: EXIF-rotated, converted to RGB (or L), the shorter side resized to
        size / crop_ratio, center-cropped."""
        if not isinstance(images, list | tuple) or not images:
            raise ValueError(f"{EXPECTED}: got no images")
        return np.stack([self._decode_one(i, img) for i, img in enumerate(images)])

    def _decode_one(self, i: int, item: Any) -> np.ndarray:
        import base64
        import binascii
        import io

        from PIL import Image, ImageOps

        if isinstance(item, str):
            try:
                item = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{EXPECTED}: image {i} is not valid base64") from None
        if not isinstance(item, bytes | bytearray):
            raise ValueError(f"{EXPECTED}: image {i} is a {type(item).__name__}")
        try:
            with Image.open(io.BytesIO(item)) as img:
                img = ImageOps.exif_transpose(img)
                mode = "RGB" if self.channels == 3 else "L"
                if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                    # 16-bit greyscale: scale to 8 bits before the mode change (PIL clips)
                    arr = np.asarray(img, dtype=np.float64)
                    img = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
                if img.mode in ("RGBA", "LA", "P", "PA"):
                    img = img.convert("RGBA")
                img = img.convert(mode)
                h, w = self.image_size
                scale = 1.0 / self.crop_ratio
                rh, rw = round(h * scale), round(w * scale)
                if self.crop_ratio == 1.0:
                    img = img.resize((w, h), Image.BILINEAR)
                else:
                    # the shorter side to size / crop_ratio, then the center crop (evaluation)
                    f = max(rh / img.height, rw / img.width)
                    img = img.resize((max(w, round(img.width * f)),
                                      max(h, round(img.height * f))), Image.BILINEAR)
                    left, top = (img.width - w) // 2, (img.height - h) // 2
                    img = img.crop((left, top, left + w, top + h))
                arr = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            if isinstance(err, ValueError) and str(err).startswith(EXPECTED):
                raise
            raise ValueError(f"{EXPECTED}: image {i} does not decode "
                             f"({' '.join(str(err).split())})") from None
        return arr[..., None] if arr.ndim == 2 else arr

    def predict_encoded(self, images: list[Any]) -> np.ndarray:
        """Probabilities for encoded images (see `decode`)."""
        return self.probabilities(self.decode(images))

    def top_k(self, probs: np.ndarray, k: int = 5) -> list[list[dict[str, Any]]]:
        """Each row's k most probable classes: [{"class": name, "probability": p}, ...]."""
        k = max(1, min(int(k), probs.shape[1]))
        names = self.classes or [str(i) for i in range(probs.shape[1])]
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[{"class": names[j], "probability": float(row[j])} for j in idx]
                for row, idx in zip(probs, order, strict=True)]


def _as_image_batch(model_input: Any) -> np.ndarray:
    """The input as a contiguous uint8 N x H x W x C array (a single H x W x C image is batched);
    a ValueError naming the expected input for anything else (float pixels included: values in
    [0, 1] would otherwise be rounded to black silently)."""
    if isinstance(model_input, dict) and len(model_input) == 1:  # one named tensor
        model_input = next(iter(model_input.values()))
    if hasattr(model_input, "to_numpy"):  # a DataFrame from a serving layer
        model_input = np.stack([np.asarray(v) for v in model_input.iloc[:, 0]])
    try:
        x = np.asarray(model_input)
    except ValueError:
        raise ValueError(f"{EXPECTED}: the images differ in shape") from None
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"{EXPECTED}: got shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind not in "iuf":
        raise ValueError(f"{EXPECTED}: got {x.dtype} values")
    # JSON serving delivers integers as int64 (or float64 when a value is written 3.0):
    # accept whole numbers 0..255, refuse fractions and anything out of range
    if x.size and (np.any(x < 0) or np.any(x > 255) or
                   (x.dtype.kind == "f" and np.any(x != np.rint(x)))):
        raise ValueError(f"{EXPECTED}: got values from {x.min()} to {x.max()} "
                         f"({x.dtype}); scale float pixels by 255 and round them")
    return np.ascontiguousarray(x.astype(np.uint8))
