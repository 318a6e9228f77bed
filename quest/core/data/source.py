"""One interface over the two data formats, so that no stage asks which one it holds.

`PreparedDataset` (uint8 arrays decoded once, batches from memory) and `StreamData` (an index of
files or shards decoded by DataLoader workers) both implement `ImageData`: split sizes, a seeded
sample of images, the training labels where they are known, the corrupt samples replaced while
streaming, and the evaluation and training loaders. Where the two formats need different
algorithms rather than different loaders (the features stage appends a stream's vectors as it
goes), the stage reads `streamed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class LoaderSettings:
    """How batches are made, whichever the format: normalisation, device and layout, the
    augmentation, the DataLoader workers (streams) and the loader kind (prepared data)."""

    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    channels_last: bool = False
    workers: int = 0
    flip: bool = True
    padding: int = 4
    padding_mode: str = "constant"
    kind: str = "memory"  # prepared data: "memory" (batched tensors) or "dataloader"


@dataclass(frozen=True)
class TrainOptions:
    """One training run's batching: global batch size, shuffling seed, repeats per epoch,
    whether the last partial batch is dropped, and this rank's share under torchrun."""

    batch_size: int
    seed: int = 0
    repeat: int = 1
    drop_last: bool | None = None
    rank: int = 0
    world: int = 1


class ImageData(Protocol):
    """What the stages read from a dataset, prepared or streamed."""

    classes: list[str]
    meta: dict[str, Any]
    # True for a stream: each rank's loader already reads its own share of the data
    streamed: bool

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the loaders yield."""
        ...

    def split_size(self, split: str) -> int:
        """Number of images in the train, val or test split (0: no such split)."""
        ...

    def sample_images(self, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Up to `n` seeded uint8 images (N x C x H x W) of a split and their labels."""
        ...

    def train_labels(self) -> np.ndarray | None:
        """The training split's labels in index order (None where the format does not hold
        them: a stream's labels are read with its images)."""
        ...

    def fault_summary(self) -> dict[str, Any] | None:
        """The corrupt samples this data's loaders replaced (None: not a stream)."""
        ...

    def eval_loader(self, split: str, batch_size: int, s: LoaderSettings) -> Any:
        """Un-augmented batches of a split, in order."""
        ...

    def loaders(self, opt: TrainOptions, s: LoaderSettings) -> tuple[Any, Any]:
        """The training loader (this rank's share) and the test loader of a run."""
        ...
