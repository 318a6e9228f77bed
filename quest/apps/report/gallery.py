"""Visual-word gallery: the image patches the teacher assigns most strongly to frequent words.

Feature position (i, j) of an H x W map computed from an S x S image is shown as the patch
centred at ((i + 0.5) S/H, (j + 0.5) S/W) with side ``patch_scale * S/H`` pixels (the feature
stride times patch_scale; gray padding where it leaves the image). Positions are ranked by the
teacher's soft assignment p_T(k | f) = softmax_k(-T ||f - c_k||^2) to the word; ties, common
where p saturates at 1, go to the smaller squared distance to the word.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from quest.core.losses import assignment_logits, pool_teacher_map
from quest.core.models.taps import FeatureTap

PAD_VALUE = 128  # gray, so padding is told apart from black image content
TILE_PX = 48  # a patch is enlarged (nearest neighbour) to about this many pixels
GAP_PX = 2


@dataclass
class WordGrid:
    """One word's strongest patches, as an image grid (PNG bytes) and its numbers."""

    word: int
    count: int
    share: float
    mean_prob: float
    png: bytes
    patches: int


@dataclass
class Gallery:
    """The gallery of the most frequent words in a sample of test images."""

    layer: str
    map_shape: tuple[int, int]
    image_size: tuple[int, int]
    patch_px: int
    temperature: float
    images: int
    positions: int
    grids: list[WordGrid] = field(default_factory=list)


def _assign(teacher: nn.Module, layer: str, images: np.ndarray, mean: list[float],
            std: list[float], codebook: torch.Tensor, temperature: float,
            device: torch.device, batch: int = 250, pool: int = 1) -> tuple[np.ndarray, ...]:
    """Nearest word, its log-probability and squared distance per position: N x H x W each."""
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    words, logps, dists = [], [], []
    teacher.eval()
    with FeatureTap(teacher, [layer]) as tap, torch.inference_mode():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.asarray(images[start : start + batch])).to(device)
            teacher((x.float() / 255.0 - m) / s)
            # pooled as the codebook's vectors were (features.pool): the words it shows are
            # the ones training assigned
            fmap = pool_teacher_map(tap.outputs[layer].float(), pool)
            logits = assignment_logits(fmap, codebook, temperature)
            best, word = logits.max(dim=-1)
            logp = best - torch.logsumexp(logits, dim=-1)
            words.append(word.cpu().numpy())
            logps.append(logp.cpu().numpy())
            dists.append((-best / temperature).cpu().numpy())
    return np.concatenate(words), np.concatenate(logps), np.concatenate(dists)


def crop_patch(image: np.ndarray, i: int, j: int, map_hw: tuple[int, int], side: int) -> np.ndarray:
    """The side x side patch (C x side x side) centred on feature position (i, j), gray-padded."""
    c, h, w = image.shape
    cy, cx = (i + 0.5) * h / map_hw[0], (j + 0.5) * w / map_hw[1]
    top, left = int(math.floor(cy - side / 2)), int(math.floor(cx - side / 2))
    padded = np.pad(image, ((0, 0), (side, side), (side, side)), constant_values=PAD_VALUE)
    return padded[:, top + side : top + 2 * side, left + side : left + 2 * side]


def grid_png(patches: list[np.ndarray], slots: int, side: int) -> bytes:
    """Patches (C x side x side uint8) tiled row-major into a PNG; empty slots stay white."""
    from PIL import Image

    zoom = max(1, round(TILE_PX / side))
    tile = side * zoom
    cols = min(8, slots)
    rows = -(-slots // cols)
    canvas = np.full((rows * (tile + GAP_PX) - GAP_PX, cols * (tile + GAP_PX) - GAP_PX, 3), 255,
                     dtype=np.uint8)
    for n, patch in enumerate(patches):
        rgb = np.repeat(patch, 3, axis=0) if patch.shape[0] == 1 else patch[:3]
        big = rgb.transpose(1, 2, 0).repeat(zoom, axis=0).repeat(zoom, axis=1)
        r, c = divmod(n, cols)
        y, x = r * (tile + GAP_PX), c * (tile + GAP_PX)
        canvas[y : y + tile, x : x + tile] = big
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def build_gallery(teacher: nn.Module, layer: str, codebook: np.ndarray, images: np.ndarray,
                  mean: list[float], std: list[float], *, temperature: float, words: int,
                  patches: int, patch_scale: float, device: torch.device,
                  pool: int = 1) -> Gallery:
    """Rank positions of `images` (N x C x S x S uint8) by assignment to the top `words` words."""
    cb = torch.from_numpy(np.asarray(codebook, dtype=np.float32)).to(device)
    word, logp, dist = _assign(teacher, layer, images, mean, std, cb, temperature, device,
                               pool=pool)
    n, h, w = word.shape
    side = max(1, round(patch_scale * images.shape[2] / h))
    flat_word, flat_logp, flat_dist = word.ravel(), logp.ravel(), dist.ravel()
    counts = np.bincount(flat_word, minlength=cb.shape[0])
    order = np.argsort(-counts, kind="stable")
    top = [int(k) for k in order[:words] if counts[k] > 0]
    gallery = Gallery(layer=layer, map_shape=(h, w),
                      image_size=(int(images.shape[2]), int(images.shape[3])), patch_px=side,
                      temperature=temperature, images=n, positions=int(flat_word.size))
    for k in top:
        idx = np.flatnonzero(flat_word == k)
        # strongest first: highest p_T(k|f), then the smallest distance to the word
        ranked = idx[np.lexsort((flat_dist[idx], -flat_logp[idx]))][:patches]
        crops = []
        for pos in ranked:
            img, rest = divmod(int(pos), h * w)
            i, j = divmod(rest, w)
            crops.append(crop_patch(np.asarray(images[img]), i, j, (h, w), side))
        gallery.grids.append(WordGrid(
            word=k, count=int(counts[k]), share=float(counts[k] / flat_word.size),
            mean_prob=float(np.exp(flat_logp[idx]).mean()), png=grid_png(crops, patches, side),
            patches=len(crops)))
    return gallery
