"""Write WebDataset tar shards from an image folder, and generate ImageNet-shaped test folders.

`quest shards SRC OUT` turns train/<class>/<image> and test/<class>/<image> into
OUT/train-000000.tar, ..., OUT/test-000000.tar (each sample KEY.jpg + KEY.cls) and
OUT/classes.txt, with webdataset's ShardWriter; the streaming path reads them back
(data.format: stream, data.location: OUT). Shards are written under temporary names and renamed
when complete, so an interrupted run leaves no half shard that looks whole.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from quest.core.data.stream import SPLITS, scan_folder
from quest.infra.errors import QuestError
from quest.infra.progress import log


def write_shards(src: Path, out: Path, size: int = 1000, seed: int = 0) -> dict[str, int]:
    """Write `src`'s images as shards of at most `size` samples (shuffled with `seed`, so each
    shard mixes classes); returns the number of shards per split."""
    import webdataset as wds

    if size < 1:
        raise QuestError(f"--size {size}: a shard holds at least one sample")
    index = scan_folder(src, "fail")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise QuestError(f"{out} already holds .tar shards: write into an empty folder")
    made: dict[str, int] = {}
    for split in SPLITS:
        items = list(index.items[split])
        random.Random(seed).shuffle(items)
        pattern = str(out / f".{split}-%06d.tar.tmp")
        with wds.ShardWriter(pattern, maxcount=size, verbose=0) as sink:
            for i, (rel, label) in enumerate(items):
                suffix = Path(rel).suffix.lower().lstrip(".")
                ext = {"jpeg": "jpg"}.get(suffix, suffix)
                sink.write({"__key__": f"{split}{i:08d}", ext: (src / rel).read_bytes(),
                            "cls": str(label)})
        tmp = sorted(out.glob(f".{split}-*.tar.tmp"))
        for path in tmp:
            os.replace(path, out / path.name[1:].removesuffix(".tmp"))
        made[split] = len(tmp)
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in index.classes))
    log.info("wrote %d train and %d test shards of up to %d samples to %s", made["train"],
             made["test"], size, out)
    return made


def make_image_folder(root: Path, classes: int = 10, train_per_class: int = 20,
                      test_per_class: int = 5, sides: tuple[int, int] = (64, 160),
                      seed: int = 0) -> Path:
    """Generate an ImageNet-shaped folder: train/ and test/ with `classes` class folders of
    JPEGs of mixed sizes and aspect ratios (sides drawn from `sides`), each class a distinct
    colour and stripe pattern so that a network can learn it."""
    rng = np.random.default_rng(seed)
    lo, hi = sides
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(37 * c) % 256, (91 * c + 60) % 256, (151 * c + 120) % 256])
            for i in range(n):
                h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
                yy, xx = np.mgrid[0:h, 0:w]
                stripes = np.sin((xx * np.cos(c) + yy * np.sin(c)) / (3 + c % 5))[..., None]
                img = base + 60 * stripes + rng.normal(0, 25, (h, w, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    folder / f"{split}_{c}_{i:05d}.jpg", quality=85)
    return root
