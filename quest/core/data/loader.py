"""Batch loaders: in-memory tensors with batched augmentation, and a torch DataLoader fallback."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler


@dataclass(frozen=True)
class Batching:
    """How a loader batches and augments one split: the keywords both loaders take
    (InMemoryLoader and make_dataloader), with one set of defaults. `drop_last` None: drop an
    epoch's partial last batch in training only; `repeat`: shuffles of the images per training
    epoch; padding and flip apply in training only."""

    batch_size: int
    mean: Sequence[float]
    std: Sequence[float]
    train: bool
    padding: int = 4
    flip: bool = True
    seed: int = 0
    repeat: int = 1
    padding_mode: str = "constant"
    drop_last: bool | None = None

    @property
    def drops_last(self) -> bool:
        """Whether an epoch drops its partial last batch."""
        return self.train if self.drop_last is None else self.drop_last


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Turn a uint8 batch ``[B,C,H,W]`` into normalised float32."""
    return (images.float().div_(255.0) - mean) / std


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small CPU tensor to `device`; to CUDA via pinned memory, so the host never waits."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def random_crop_flip(
    images: Tensor, padding: int, flip: bool, generator: torch.Generator,
    padding_mode: str = "constant",
) -> Tensor:
    """Pad (zeros, or `padding_mode` "reflect"), randomly crop back to size and randomly flip a
    whole batch with one gather."""
    b, _, h, w = images.shape
    out = images
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding), mode=padding_mode)
        # drawn on the CPU generator (resume-identical), copied without a host-device sync
        off_y = _to_device(torch.randint(0, 2 * padding + 1, (b,), generator=generator),
                           images.device)
        off_x = _to_device(torch.randint(0, 2 * padding + 1, (b,), generator=generator),
                           images.device)
        rows = off_y[:, None] + torch.arange(h, device=images.device)[None, :]
        cols = off_x[:, None] + torch.arange(w, device=images.device)[None, :]
        bidx = torch.arange(b, device=images.device)[:, None, None]
        # gather on a channels-last view: [B, Hp, Wp, C] -> [B, H, W, C]
        nhwc = padded.permute(0, 2, 3, 1)
        out = nhwc[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = _to_device(torch.rand(b, generator=generator) < 0.5, images.device)
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out


def last_batch_size(samples: int, batch_size: int, drop_last: bool) -> int:
    """Size of the last batch of an epoch of `samples` in batches of `batch_size`."""
    rest = samples % batch_size
    return batch_size if drop_last or not rest else rest


class InMemoryLoader:
    """Iterate over uint8 tensors held in memory (CPU or GPU), augmenting whole batches at once.

    Shuffling, crops and flips come from a CPU generator seeded with ``seed`` and the epoch, so an
    epoch's batches are the same whether or not the run was interrupted and resumed. Training
    batches are (images, labels, indices), each sample's row in `images`; evaluation batches are
    (images, labels). `drop_last` (default: in training) drops an epoch's partial last batch;
    the official transfer-learning sampler keeps it (train.drop_last false).
    """

    def __init__(self, images: np.ndarray | Tensor, labels: np.ndarray | Tensor, *,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 **batching: Any) -> None:
        b = Batching(**batching)  # batch_size, mean, std, train, ... (see Batching)
        self.device = torch.device(device)
        arr = images if isinstance(images, Tensor) else np.asarray(images)
        if isinstance(arr, np.ndarray) and not arr.flags.writeable:
            arr = np.array(arr)  # memory-mapped input: copy into RAM once
        self.images = torch.as_tensor(arr).to(self.device)
        self.labels = torch.as_tensor(np.array(labels), dtype=torch.long).to(self.device)
        self.batch_size = int(b.batch_size)
        self.mean = torch.tensor(b.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(b.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.train = b.train
        self.padding = b.padding if b.train else 0
        self.padding_mode = b.padding_mode
        self.flip = b.flip and b.train
        self.seed = int(b.seed)
        self.epoch = 0
        self.channels_last = channels_last
        # a training epoch is `repeat` consecutive shuffles of the images
        self.repeat = int(b.repeat) if b.train else 1
        self.drop_last = b.drops_last

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffling and augmentation the next iteration reproduces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.labels) * self.repeat
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Number of images the loader holds."""
        return len(self.labels)

    @property
    def last_batch(self) -> int:
        """Size of an epoch's last batch (partial where it is kept)."""
        return last_batch_size(len(self.labels) * self.repeat, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.labels)
        if self.train:
            order = torch.cat([torch.randperm(n, generator=gen) for _ in range(self.repeat)])
        else:
            order = torch.arange(n)
        order = order.to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images.index_select(0, idx)
            if self.train:
                x = random_crop_flip(x, self.padding, self.flip, gen, self.padding_mode)
            x = normalize(x, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            labels = self.labels.index_select(0, idx)
            yield (x, labels, idx) if self.train else (x, labels)


class ArrayDataset(Dataset):
    """Per-sample dataset over (possibly memory-mapped) uint8 arrays, for data too big for RAM:
    training items are (image, label, index), evaluation items (image, label)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        padding: int = 4,
        flip: bool = True,
        padding_mode: str = "constant",
    ) -> None:
        from torchvision.transforms import v2

        self.images = images
        self.labels = labels
        self.train = train
        steps: list[object] = []
        if train:
            if padding:
                steps.append(v2.RandomCrop(images.shape[-1], padding=padding,
                                          padding_mode=padding_mode))
            if flip:
                steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | tuple[Tensor, int, int]:
        img = torch.from_numpy(np.array(self.images[i]))
        if self.train:
            return self.transform(img), int(self.labels[i]), i
        return self.transform(img), int(self.labels[i])


def make_dataloader(images: np.ndarray, labels: np.ndarray, *, num_workers: int = 0,
                    **batching: Any) -> DataLoader:
    """A torch DataLoader with per-sample transforms, for datasets that do not fit in memory;
    `batching` holds InMemoryLoader's keywords (see Batching).

    A training epoch is `repeat` consecutive shuffles of the images (RandomSampler without
    replacement draws whole permutations back to back); training batches are (images, labels,
    indices)."""
    b = Batching(**batching)
    ds = ArrayDataset(images, labels, b.mean, b.std, b.train, b.padding, b.flip, b.padding_mode)
    gen = torch.Generator().manual_seed(b.seed)
    sampler = None
    if b.train and b.repeat > 1:
        sampler = RandomSampler(ds, num_samples=len(ds) * b.repeat, generator=gen)
    return DataLoader(
        ds,
        batch_size=b.batch_size,
        shuffle=b.train and sampler is None,
        sampler=sampler,
        drop_last=b.drops_last,
        num_workers=num_workers,
        generator=gen,
        persistent_workers=num_workers > 0,
    )


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images scaled to [0, 1]."""
    c = images.shape[1]
    total = np.zeros(c, dtype=np.float64)
    total_sq = np.zeros(c, dtype=np.float64)
    count = 0
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start : start + chunk], dtype=np.float64) / 255.0
        total += block.sum(axis=(0, 2, 3))
        total_sq += (block**2).sum(axis=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]


class EpochLoader:
    """Adapts a torch DataLoader to the loader protocol the Trainer uses (set_epoch, device)."""

    def __init__(self, loader: Any, device: torch.device, channels_last: bool) -> None:
        self.loader, self.device, self.channels_last = loader, device, channels_last
        gen = loader.generator
        self.base_seed = gen.initial_seed() if gen is not None else 0

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffling so that an epoch's order does not depend on earlier epochs."""
        if self.loader.generator is not None:
            self.loader.generator.manual_seed(self.base_seed * 1_000_003 + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def last_batch(self) -> int:
        """Size of an epoch's last batch (partial where it is kept)."""
        dl = self.loader
        return last_batch_size(len(dl.sampler), dl.batch_size, dl.drop_last)

    def __iter__(self):  # type: ignore[no-untyped-def]
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        # training batches carry each sample's index after the labels (ArrayDataset)
        for x, *rest in self.loader:
            x = x.to(self.device).contiguous(memory_format=fmt)
            yield (x, *(t.to(self.device) for t in rest))
