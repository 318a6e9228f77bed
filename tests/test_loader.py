"""In-memory batched augmentation and the DataLoader path: shapes, determinism, semantics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quest.core.data.loader import InMemoryLoader, channel_stats, make_dataloader, random_crop_flip


def data(n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), np.arange(n) % 10


def loader(seed: int = 0, train: bool = True) -> InMemoryLoader:
    x, y = data()
    return InMemoryLoader(x, y, batch_size=32, mean=[0.5] * 3, std=[0.25] * 3, train=train,
                          seed=seed)


def test_shapes_and_batch_count() -> None:
    train, test = loader(), loader(train=False)
    batches = list(train)
    assert len(batches) == len(train) == 3  # drop_last for training
    assert all(x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 for x, _, _ in batches)
    assert len(list(test)) == 4 and sum(len(y) for _, y in test) == 100


def test_same_seed_same_batches_other_seed_or_epoch_differs() -> None:
    a, b, c = loader(0), loader(0), loader(1)
    xa, ya, _ = next(iter(a))
    xb, yb, _ = next(iter(b))
    xc, _, _ = next(iter(c))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)
    a.set_epoch(1)
    assert not torch.equal(next(iter(a))[0], xa)
    a.set_epoch(0)
    assert torch.equal(next(iter(a))[0], xa)


def test_eval_loader_is_plain_normalisation_in_order() -> None:
    x, y = data()
    test = loader(train=False)
    xb, yb = next(iter(test))
    expected = (torch.from_numpy(x[:32]).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(xb, expected)
    assert yb.tolist() == y[:32].tolist()


def test_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).reshape(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(3)
    out = random_crop_flip(img, padding=2, flip=False, generator=gen)
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flip_only_mirrors() -> None:
    img = torch.arange(64 * 3 * 4 * 4, dtype=torch.uint8).reshape(64, 3, 4, 4)
    out = random_crop_flip(img, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, img, strict=True)]
    same = [torch.equal(o, i) for o, i in zip(out, img, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 10 < sum(flipped) < 54  # about half


def test_dataloader_path_shapes_and_normalisation() -> None:
    x, y = data()
    dl = make_dataloader(x, y, batch_size=16, mean=[0.5] * 3, std=[0.25] * 3, train=False)
    xb, yb = next(iter(dl))
    assert xb.shape == (16, 3, 32, 32)
    torch.testing.assert_close(xb, (torch.from_numpy(x[:16]).float() / 255 - 0.5) / 0.25)
    train = make_dataloader(x, y, batch_size=16, mean=[0.5] * 3, std=[0.25] * 3, train=True)
    assert next(iter(train))[0].shape == (16, 3, 32, 32)


def test_channel_stats() -> None:
    x = np.zeros((4, 3, 2, 2), dtype=np.uint8)
    x[:, 1] = 255
    x[:2, 2] = 255
    mean, std = channel_stats(x)
    assert mean == [0.0, 1.0, 0.5] and std == [0.0, 0.0, 0.5]


def test_dataloader_path_through_the_stage_helpers_is_epoch_deterministic(smoke_prepared) -> None:
    from quest.apps.stages.common import make_loaders
    from quest.core.data.prepared import load_prepared
    from quest.infra.config import Config

    cfg = Config()
    cfg.data.loader = "dataloader"
    ds = load_prepared(smoke_prepared)
    cfg.student.train.batch_size = 50
    train, test = make_loaders(ds, cfg, cfg.student.train, torch.device("cpu"))

    def first_labels(epoch: int) -> list[int]:
        train.set_epoch(epoch)
        return next(iter(train))[1].tolist()

    a, b, a_again = first_labels(3), first_labels(4), first_labels(3)
    assert a == a_again and a != b
    x, _ = next(iter(test))
    assert x.shape == (len(ds.test.labels), 3, 32, 32)  # 100 test images, one batch of 256


def test_repeat_is_consecutive_fresh_shuffles_of_the_subset() -> None:
    """The official few-images sampler: an epoch passes `repeat` times over the images, each
    pass a new permutation, so a small subset keeps the full set's step count."""
    x, y = data(40)
    x[:, 0, 0, 0] = np.arange(40)  # the first pixel names the image
    rep = InMemoryLoader(x, y, batch_size=8, mean=[0.5] * 3, std=[0.25] * 3, train=True,
                         seed=3, repeat=5, padding=0, flip=False)
    assert len(rep) == 25
    seen = torch.cat([(xb[:, 0, 0, 0] * 0.25 + 0.5).mul(255).round().long() for xb, _, _ in rep])
    assert len(seen) == 200
    for i in range(5):  # each pass is a whole permutation: every image exactly once
        assert sorted(seen[i * 40:(i + 1) * 40].tolist()) == list(range(40))
    orders = [seen[i * 40:(i + 1) * 40] for i in range(5)]
    assert not all(torch.equal(orders[0], o) for o in orders[1:])  # fresh shuffles
    # repeat=1 draws exactly the single permutation it always drew (old runs reproduce)
    one = InMemoryLoader(x, y, batch_size=8, mean=[0.5] * 3, std=[0.25] * 3, train=True,
                         seed=3, padding=0, flip=False)
    gen = torch.Generator().manual_seed(3 * 1_000_003)
    order = torch.randperm(40, generator=gen)
    assert torch.equal(torch.cat([lab for _, lab, _ in one]), torch.as_tensor(y)[order])
    # the DataLoader path samples the same way
    dl = make_dataloader(x, y, batch_size=8, mean=[0.5] * 3, std=[0.25] * 3, train=True,
                         seed=3, repeat=5, padding=0, flip=False)
    assert len(dl) == 25 and sum(len(lab) for _, lab, _ in dl) == 200


def _named(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images whose every pixel names the image (n <= 256), labels shuffled against them."""
    x = np.repeat(np.arange(n, dtype=np.uint8), 3 * 4 * 4).reshape(n, 3, 4, 4)
    return x, np.random.default_rng(1).integers(0, 10, n)


def _decoded(images: torch.Tensor) -> torch.Tensor:
    """The image numbers back from normalised batches (mean 0.5, std 0.25)."""
    return (images[:, 0, 0, 0] * 0.25 + 0.5).mul(255).round().long()


def test_training_batches_carry_each_sample_index_in_both_loaders() -> None:
    """The index of every sample is its row in the arrays, whatever the loader, shuffle or
    worker count; an epoch of `repeat` 2 holds each index twice."""
    from quest.core.data.loader import EpochLoader

    x, y = _named(40)
    common = {"batch_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3, "train": True, "seed": 2,
              "repeat": 2, "padding": 0, "flip": False}
    memory = InMemoryLoader(x, y, **common)
    loaders = {"memory": memory}
    for workers in (0, 2):
        dl = make_dataloader(x, y, num_workers=workers, **common)
        loaders[f"dataloader{workers}"] = EpochLoader(dl, torch.device("cpu"), False)
    for name, loader in loaders.items():
        loader.set_epoch(1)
        seen = []
        for images, labels, idx in loader:
            assert idx.dtype == torch.int64, name
            assert torch.equal(_decoded(images), idx), name  # the image the index names
            assert torch.equal(labels, torch.as_tensor(y)[idx]), name
            seen += idx.tolist()
        assert sorted(seen) == sorted(list(range(40)) * 2), name
    # evaluation batches stay (images, labels), in order
    assert all(len(b) == 2 for b in InMemoryLoader(x, y, batch_size=16, mean=[0.5] * 3,
                                                   std=[0.25] * 3, train=False))


def test_few_images_sampler_keeps_the_last_partial_batch_as_the_official_one(
        smoke_prepared) -> None:
    """valeoai/QuEST's DataloaderSampler at 10 images per class of MIT-67 (67 x 8 training
    images repeated 10 times, batch 128): 5360 samples in 42 steps, the last of 112, not 41.
    The MIT-67 presets set train.drop_last false; by default an epoch drops its partial batch
    (the CIFAR studies' step counts and records)."""
    from quest.apps.stages.common import make_loaders
    from quest.core.data.prepared import load_prepared
    from quest.infra.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml",
                      "mit67-resnet34-resnet18-img10")
    opt = cfg.student.train
    assert (opt.batch_size, opt.repeat, opt.drop_last) == (128, 10, False)
    n = 67 * 8
    x = np.zeros((n, 3, 2, 2), dtype=np.uint8)
    y = np.arange(n) % 67
    common = {"mean": [0.5] * 3, "std": [0.25] * 3, "train": True, "padding": 0,
              "flip": False, "batch_size": 128, "repeat": 10}
    memory = InMemoryLoader(x, y, drop_last=False, **common)
    sizes = [len(lab) for _, lab, _ in memory]
    assert len(memory) == len(sizes) == 42 and sizes[-1] == 112 == memory.last_batch
    assert sum(sizes) == n * 10
    dl = make_dataloader(x, y, drop_last=False, **common)
    sizes = [len(lab) for _, lab, _ in dl]
    assert len(dl) == len(sizes) == 42 and sizes[-1] == 112
    dropped = InMemoryLoader(x, y, **common)  # the default
    assert len(dropped) == len(list(dropped)) == 41 and dropped.last_batch == 128
    assert len(make_dataloader(x, y, **common)) == 41
    # the setting reaches the stage's loaders (memory and DataLoader)
    ds = load_prepared(smoke_prepared)
    full, rest = divmod(len(ds.train.labels) * 10, 128)
    assert rest  # the smoke split repeated 10 times ends with a partial batch
    for kind in ("memory", "dataloader"):
        cfg.data.loader = kind
        for drop, steps, last in ((False, full + 1, rest), (True, full, 128)):
            opt.drop_last = drop
            train, _ = make_loaders(ds, cfg, opt, torch.device("cpu"))
            assert (len(train), train.last_batch) == (steps, last), kind
