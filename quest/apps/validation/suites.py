"""The four suites as pandas tables plus Great Expectations expectations over them.

Each builder reads what a stage wrote, reduces it to small tables (one row per image, vector, word
or prediction, and one row per class, split or model) and attaches the expectations that the
thresholds in ``validation:`` of params.yaml ask for. The builders never judge anything
themselves: every verdict comes from GX, so the Data Docs show exactly what failed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
from great_expectations.expectations.row_conditions import Column

from quest.infra.config import Config
from quest.infra.errors import QuestError
from quest.infra.io_utils import file_sha256, read_json
from quest.infra.paths import Paths

# rows per chunk when reducing images or vectors: bounded memory for memory-mapped inputs
_CHUNK = 8192


@dataclass
class Table:
    """One GX batch: a dataframe, its expectations, and the columns that name a failing row."""

    name: str
    frame: pd.DataFrame
    expectations: list[Any]
    index_columns: list[str] = field(default_factory=list)


@dataclass
class Suite:
    """A suite's tables, what it observed (for the report) and the hashes of what it checked."""

    tables: list[Table]
    observed: dict[str, Any]
    inputs: dict[str, str]


def _split_rows(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """Per-image pixel mean, pixel std and content digest, reading the array chunk by chunk."""
    n = images.shape[0]
    means = np.empty(n, dtype=np.float64)
    stds = np.empty(n, dtype=np.float64)
    digests: list[bytes] = []
    for start in range(0, n, _CHUNK):
        block = np.ascontiguousarray(images[start : start + _CHUNK])
        flat = block.reshape(block.shape[0], -1).astype(np.float32)
        means[start : start + len(block)] = flat.mean(axis=1)
        stds[start : start + len(block)] = flat.std(axis=1)
        # exact duplicates: same bytes, same shape (blake2b is fast; 16 bytes make collisions moot)
        digests += [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in block]
    return means, stds, digests


@dataclass
class _DataFrames:
    """The prepared data seen as the three tables the data suite checks."""

    arrays: list[dict[str, Any]]
    images: pd.DataFrame
    classes: list[dict[str, Any]]
    duplicates: np.ndarray  # per test image: an exact copy of a training image
    train_hw: tuple[int, ...]
    # per validation image: an exact copy of a training image, of a test image
    val_duplicates: dict[str, np.ndarray] = field(default_factory=dict)


def _splits(ds: Any) -> dict[str, Any]:
    """The dataset's splits by name: train, test, and val when it has a validation split."""
    out = {"train": ds.train, "test": ds.test}
    val = getattr(ds, "val", None)
    if val is not None and len(val):
        out["val"] = val
    return out


def _data_frames(ds: Any) -> _DataFrames:
    """Per split: array facts, per-image pixel statistics and label, per-class counts."""
    k = ds.num_classes
    splits = _splits(ds)
    train_hw = tuple(int(s) for s in ds.train.images.shape[2:4]) if ds.train.images.ndim == 4 \
        else (-1, -1)
    arrays, images, classes = [], [], []
    digests: dict[str, list[bytes]] = {}
    for name, split in splits.items():
        arr = split.images
        shape = list(arr.shape) + [-1] * (4 - arr.ndim)
        arrays.append({"split": name, "dtype": str(arr.dtype), "ndim": arr.ndim,
                       "channels": shape[1], "height": shape[2], "width": shape[3],
                       "images": int(arr.shape[0]), "labels": int(split.labels.shape[0])})
        means, stds, digests[name] = _split_rows(arr)
        images.append(pd.DataFrame({"split": name, "index": np.arange(len(means)),
                                    "label": np.asarray(split.labels, dtype=np.int64),
                                    "pixel_mean": means, "pixel_std": stds}))
        counts = np.bincount(np.clip(np.asarray(split.labels, dtype=np.int64), 0, None),
                             minlength=k)[:k]
        mean_count = float(counts.mean()) if k else 0.0
        for i, cls in enumerate(ds.classes):
            classes.append({"split": name, "class": cls, "count": int(counts[i]),
                            "share_of_mean": float(counts[i] / mean_count) if mean_count else 0.0})
    train_set = set(digests["train"])
    dup = np.array([d in train_set for d in digests["test"]], dtype=bool)
    frame = pd.concat(images, ignore_index=True)
    sizes = {name: len(split) for name, split in splits.items()}

    def only(name: str, flags: np.ndarray) -> np.ndarray:
        """`flags` on `name`'s rows, False on every other split's (rows in split order)."""
        return np.concatenate([flags if s == name else np.zeros(n, dtype=bool)
                               for s, n in sizes.items()])

    frame["duplicate_of_train"] = only("test", dup)
    val_dups: dict[str, np.ndarray] = {}
    if "val" in digests:
        # the validation split must be disjoint from both: an image held out for choosing is
        # neither trained on nor the test split reported on
        test_set = set(digests["test"])
        val_dups = {"train": np.array([d in train_set for d in digests["val"]], dtype=bool),
                    "test": np.array([d in test_set for d in digests["val"]], dtype=bool)}
        frame["val_duplicate_of_train"] = only("val", val_dups["train"])
        frame["val_duplicate_of_test"] = only("val", val_dups["test"])
    return _DataFrames(arrays, frame, classes, dup, train_hw, val_dups)


def _image_expectations(cfg: Config, k: int, n_test: int, n_val: int = 0) -> list[Any]:
    """Labels in range, few test/train duplicates (and, with a validation split, few
    val/train and val/test duplicates), plausible pixel statistics per split."""
    v = cfg.validation.data
    max_dups = math.floor(v.max_duplicate_share * n_test)
    exps: list[Any] = [
        gxe.ExpectColumnValuesToBeBetween(
            column="label", min_value=0, max_value=k - 1,
            description=f"labels lie in [0, {k - 1}] ({k} classes)"),
        gxe.ExpectColumnSumToBeBetween(
            column="duplicate_of_train", min_value=0, max_value=max_dups,
            description=f"at most {max_dups} test images ({v.max_duplicate_share:.1%} of "
                        f"{n_test}) are exact duplicates of training images"),
    ]
    if n_val:
        max_val = math.floor(v.max_duplicate_share * n_val)
        exps += [gxe.ExpectColumnSumToBeBetween(
            column=f"val_duplicate_of_{other}", min_value=0, max_value=max_val,
            description=f"at most {max_val} validation images ({v.max_duplicate_share:.1%} of "
                        f"{n_val}) are exact duplicates of {other} images (the validation "
                        f"split is disjoint from the {other} split)")
            for other in ("train", "test")]
    for name in ("train", "test") + (("val",) if n_val else ()):
        # GX 1.x condition objects (string row conditions are deprecated since 1.9)
        cond = {"row_condition": Column("split") == name}
        exps += [
            gxe.ExpectColumnMeanToBeBetween(
                column="pixel_mean", min_value=v.pixel_mean_min, max_value=v.pixel_mean_max,
                description=f"{name} mean pixel value in [{v.pixel_mean_min:g}, "
                            f"{v.pixel_mean_max:g}]", **cond),
            gxe.ExpectColumnMeanToBeBetween(
                column="pixel_std", min_value=v.pixel_std_min,
                description=f"{name} mean per-image pixel std >= {v.pixel_std_min:g}", **cond),
        ]
    return exps


def _array_expectations(cfg: Config, train_hw: tuple[int, ...]) -> list[Any]:
    """uint8 N x C x H x W arrays with the configured channels and one image size."""
    exps: list[Any] = [
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"],
                                        description="image arrays are uint8"),
        gxe.ExpectColumnValuesToBeInSet(column="ndim", value_set=[4],
                                        description="image arrays are N x C x H x W"),
        gxe.ExpectColumnValuesToBeInSet(
            column="channels", value_set=[cfg.data.channels],
            description=f"images have {cfg.data.channels} channel(s) (data.channels)"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="images", column_B="labels",
                                            description="one label per image"),
    ]
    expected_hw = [cfg.data.image_size] if cfg.data.image_size else None
    for axis, size in (("height", 0), ("width", 1)):
        allowed = expected_hw or [train_hw[size]]
        what = "data.image_size" if expected_hw else "the training split's"
        exps.append(gxe.ExpectColumnValuesToBeInSet(
            column=axis, value_set=allowed, description=f"image {axis} is {allowed[0]} ({what})"))
    return exps


# images per split whose pixels the data suite checks when the data is streamed
STREAM_SAMPLE = 256


def _stream_view(ds: Any) -> Any:
    """A streamed dataset seen as the data suite sees prepared arrays: a seeded sample of
    evaluation crops per split (pixels, shapes, duplicates) and the index's full class counts."""
    from types import SimpleNamespace

    from quest.core.data.prepared import Split

    splits = {}
    for name in ("train", "test"):
        images, labels = ds.sample_images(name, STREAM_SAMPLE, seed=0)
        splits[name] = Split(images, labels)
    return SimpleNamespace(num_classes=len(ds.classes), classes=ds.classes, meta=ds.meta,
                           train=splits["train"], test=splits["test"])


def _data_observed(ds: Any, f: Any, splits: dict[str, Any],
                   full: dict[str, dict[str, int]] | None,
                   faults: dict[str, int]) -> dict[str, Any]:
    """What the data report shows beside the expectations: classes, the validation split's
    draw, images and class counts per split, duplicates, unreadable images, pixel statistics."""
    skipped = ds.meta.get("skipped")
    names = tuple(splits)
    frame = f.images
    if "validation" in ds.meta:  # how the split was drawn, for the data report
        validation_note = {"validation": ds.meta["validation"]}
    else:
        validation_note = {}
    observed = {
        "classes": ds.num_classes,
        **validation_note,
        "images": ({k: sum(c.values()) for k, c in full.items()} if full is not None
                   else {name: len(split) for name, split in splits.items()}),
        "class_counts": {name: {c["class"]: c["count"] for c in f.classes if c["split"] == name}
                         for name in names},
        "duplicates_test_in_train": int(f.duplicates.sum()),
        **{f"duplicates_val_in_{other}": int(flags.sum())
           for other, flags in f.val_duplicates.items()},
        "unreadable_images": {
            "skipped_by_prepare": int(skipped.get("count", 0)) if isinstance(skipped, dict) else 0,
            "replaced_in_sample": len(faults), "first": sorted(faults)[:20]},
        "pixel_mean": {name: float(frame.loc[frame.split == name, "pixel_mean"].mean())
                       for name in names},
        "pixel_std": {name: float(frame.loc[frame.split == name, "pixel_std"].mean())
                      for name in names},
    }
    return observed


def data_suite(cfg: Config, paths: Paths) -> Suite:
    """Prepared data: array shape and dtype, label range, class balance, duplicates, pixels
    (for a stream: the same checks on a sample of its crops, class balance on the index)."""
    from quest.apps.stages.common import load_data

    ds = load_data(paths, mmap=True)
    full: dict[str, dict[str, int]] | None = None
    faults: dict[str, int] = {}  # a stream's images that failed to decode in the sample
    if ds.streamed:
        full = {k: {str(c): int(n) for c, n in v.items()}
                for k, v in ds.meta["class_counts"].items()}
        stream, ds = ds, _stream_view(ds)
        faults = dict(stream.faults)
    v = cfg.validation.data
    f = _data_frames(ds)
    if full is not None:
        for row in f.classes:
            counts = full[row["split"]]
            mean_count = sum(counts.values()) / max(len(counts), 1)
            row["count"] = counts[row["class"]]
            row["share_of_mean"] = row["count"] / mean_count if mean_count else 0.0
    class_exps = [gxe.ExpectColumnValuesToBeBetween(
        column="share_of_mean", min_value=v.min_class_share,
        description=f"every class holds at least {v.min_class_share:.0%} of its split's mean "
                    "class count")]
    splits = _splits(ds)
    frame = f.images
    observed = _data_observed(ds, f, splits, full, faults)
    return Suite(
        tables=[Table("arrays", pd.DataFrame(f.arrays), _array_expectations(cfg, f.train_hw),
                      ["split"]),
                Table("images", frame, _image_expectations(cfg, ds.num_classes, len(ds.test),
                                                           len(splits.get("val", ()))),
                      ["split", "index"]),
                Table("classes", pd.DataFrame(f.classes), class_exps, ["split", "class"])],
        observed=observed,
        inputs={"data/prepared": str(ds.meta["data_sha256"])},
    )


def _row_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row L2 norm and count of non-finite entries, chunk by chunk, in float64."""
    n = x.shape[0]
    norms = np.empty(n, dtype=np.float64)
    bad = np.empty(n, dtype=np.int64)
    for start in range(0, n, _CHUNK * 8):
        block = np.asarray(x[start : start + _CHUNK * 8], dtype=np.float64)
        norms[start : start + len(block)] = np.sqrt((block * block).sum(axis=1))
        bad[start : start + len(block)] = (~np.isfinite(block)).sum(axis=1)
    return norms, bad


def _need(path: Any, fix: str) -> None:
    if not path.is_file():
        raise QuestError(f"{path} does not exist: {fix}")


def features_suite(cfg: Config, paths: Paths) -> Suite:
    """Teacher features: finite, vector norms in range, as many vectors as configured."""
    from quest.apps.stages.common import load_data, split_size
    from quest.apps.stages.features import stream_keep

    _need(paths.features, "run `quest features` first")
    _need(paths.features_meta, "run `quest features` first")
    feats = np.load(paths.features, mmap_mode="r")
    if feats.ndim != 2:
        raise QuestError(f"{paths.features} has shape {feats.shape}, not vectors x channels: "
                         "rerun `quest features`")
    meta = read_json(paths.features_meta)
    c, h, w = (int(s) for s in meta["map_shape"])
    # the configured count, from the prepared data and the config rather than the stage's meta
    ds = load_data(paths, mmap=True)
    positions = split_size(ds, "train") * h * w
    mv = cfg.features.max_vectors
    if ds.streamed:
        expected = stream_keep(cfg, positions)
    else:
        expected = positions if mv is None else min(mv, positions)
    v = cfg.validation.features
    norms, bad = _row_stats(feats)
    frame = pd.DataFrame({"vector": np.arange(len(norms)), "norm": norms, "nonfinite": bad})
    exps = [
        gxe.ExpectTableRowCountToEqual(
            value=expected, description=f"{expected} vectors (features.max_vectors={mv}, "
                                        f"{positions} positions)"),
        gxe.ExpectColumnValuesToBeBetween(
            column="nonfinite", min_value=0, max_value=0,
            description="no NaN or Inf in any feature vector"),
        gxe.ExpectColumnValuesToBeBetween(
            column="norm", min_value=v.norm_min, max_value=v.norm_max,
            description=f"vector L2 norms in [{v.norm_min:g}, {v.norm_max:g}]"),
    ]
    finite = norms[np.isfinite(norms)]
    observed = {
        "vectors": int(len(norms)), "expected_vectors": int(expected), "dim": int(feats.shape[1]),
        "map_channels": c, "nonfinite_vectors": int((bad > 0).sum()),
        "norm_min": float(finite.min()) if finite.size else None,
        "norm_median": float(np.median(finite)) if finite.size else None,
        "norm_max": float(finite.max()) if finite.size else None,
    }
    return Suite([Table("vectors", frame, exps, ["vector"])], observed,
                 {"data/features/teacher_features.npy": file_sha256(paths.features)})


def codebook_suite(cfg: Config, paths: Paths) -> Suite:
    """Codebook: finite words, few dead words, perplexity high enough, on the features it fits."""
    from quest.apps.stages.common import resolve_device
    from quest.core.codebook import codebook_stats, sample_training_set, usage_perplexity

    _need(paths.codebook, "run `quest codebook` first")
    _need(paths.features, "run `quest features` first")
    words = np.load(paths.codebook).astype(np.float32, copy=False)
    feats = np.load(paths.features, mmap_mode="r")
    if words.ndim != 2 or words.shape[1] != feats.shape[1]:
        raise QuestError(f"{paths.codebook} has shape {words.shape} but the features have "
                         f"{feats.shape[1]} channels: rerun `quest codebook`")
    k = int(words.shape[0])
    c = cfg.codebook
    # the points k-means saw, drawn exactly as the codebook stage draws them
    sample, _ = sample_training_set(feats, k, seed=c.seed,
                                    max_points_per_centroid=c.max_points_per_centroid)
    bad = (~np.isfinite(words)).sum(axis=1)
    usage = np.zeros(k, dtype=np.int64)
    finite = np.flatnonzero(bad == 0)
    if finite.size:
        # a NaN word would poison every distance: assign among the finite words only
        stats = codebook_stats(np.ascontiguousarray(sample, dtype=np.float32), words[finite],
                               device=str(resolve_device(cfg)))
        usage[finite] = stats["usage"]
    perplexity = usage_perplexity(usage)
    v = cfg.validation.codebook
    word_frame = pd.DataFrame({"word": np.arange(k), "nonfinite": bad, "usage": usage})
    word_exps = [
        gxe.ExpectColumnValuesToBeBetween(column="nonfinite", min_value=0, max_value=0,
                                          description="no NaN or Inf in any word"),
        # GX's mostly: the share of live words (used at least once) must be >= 1 - max dead share
        gxe.ExpectColumnValuesToBeBetween(
            column="usage", min_value=1, mostly=1.0 - v.max_dead_share,
            description=f"at most {v.max_dead_share:.0%} of the {k} words are dead "
                        "(never the nearest word of a training vector)"),
    ]
    floor = v.min_perplexity_share * k
    summary = pd.DataFrame([{"k": k, "perplexity": perplexity, "perplexity_share": perplexity / k}])
    summary_exps = [gxe.ExpectColumnValuesToBeBetween(
        column="perplexity", min_value=floor,
        description=f"usage perplexity >= {floor:g} ({v.min_perplexity_share:.0%} of K={k})")]
    observed = {"k": k, "vectors": int(sample.shape[0]), "perplexity": perplexity,
                "dead_words": int((usage == 0).sum()), "nonfinite_words": int((bad > 0).sum())}
    return Suite([Table("words", word_frame, word_exps, ["word"]),
                  Table("summary", summary, summary_exps, ["k"])], observed,
                 {"models/codebook/codebook.npy": file_sha256(paths.codebook),
                  "data/features/teacher_features.npy": file_sha256(paths.features)})


def student_probabilities(cfg: Config, paths: Paths) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Softmax outputs of every student in student.methods on the prepared test split."""
    import torch

    from quest.apps.stages.common import eval_loader, load_data, resolve_device, to_device
    from quest.core.checkpoint import load_model_file

    device = resolve_device(cfg)
    ds = load_data(paths)
    loader = eval_loader(ds, cfg, device)
    probs: dict[str, np.ndarray] = {}
    labels: list[np.ndarray] = []
    for method in cfg.student.methods:
        model, _ = load_model_file(paths.student_model(method), f"student model [{method}]")
        model = to_device(model, device, cfg.runtime.channels_last).eval()
        out = []
        seen = []
        with torch.inference_mode():
            for x, y in loader:
                out.append(torch.softmax(model(x).float(), dim=1).double().cpu().numpy())
                seen.append(y.cpu().numpy())
        probs[method] = np.concatenate(out)
        labels = seen
    return probs, np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)


def predictions_suite(cfg: Config, paths: Paths,
                      given: tuple[dict[str, np.ndarray], np.ndarray] | None = None) -> Suite:
    """Students' test-set probabilities: each row sums to 1, top-1 at least the chance floor."""
    probs, labels = given if given is not None else student_probabilities(cfg, paths)
    v = cfg.validation.predictions
    rows, models = [], []
    for method, p in probs.items():
        p = np.asarray(p, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] != labels.shape[0]:
            raise QuestError(f"predictions of {method} have shape {p.shape} for "
                             f"{labels.shape[0]} test labels: rerun `quest evaluate`")
        classes = p.shape[1]
        correct = p.argmax(axis=1) == labels
        rows.append(pd.DataFrame({"model": method, "image": np.arange(len(labels)),
                                  "prob_sum": p.sum(axis=1), "prob_min": p.min(axis=1),
                                  "correct": correct}))
        chance = 1.0 / classes
        models.append({"model": method, "top1": float(correct.mean()), "chance": chance,
                       "min_top1": v.min_top1_over_chance * chance})
    frame = pd.concat(rows, ignore_index=True)
    tol = v.sum_tolerance
    row_exps = [
        gxe.ExpectColumnValuesToNotBeNull(column="prob_sum",
                                          description="no NaN in any probability"),
        gxe.ExpectColumnValuesToBeBetween(
            column="prob_sum", min_value=1.0 - tol, max_value=1.0 + tol,
            description=f"every test image's class probabilities sum to 1 (+/- {tol:g})"),
        gxe.ExpectColumnValuesToBeBetween(column="prob_min", min_value=0.0,
                                          description="no negative probability"),
    ]
    model_exps = [gxe.ExpectColumnPairValuesAToBeGreaterThanB(
        column_A="top1", column_B="min_top1", or_equal=True,
        description=f"each student's top-1 >= {v.min_top1_over_chance:g} x chance")]
    observed = {"test_images": int(labels.shape[0]),
                "top1": {m["model"]: m["top1"] for m in models},
                "chance": models[0]["chance"] if models else None}
    inputs = {}
    for method in probs:
        f = paths.student_model(method)
        inputs[f.relative_to(paths.root).as_posix()] = file_sha256(f) if f.is_file() else "none"
    return Suite([Table("predictions", frame, row_exps, ["model", "image"]),
                  Table("models", pd.DataFrame(models), model_exps, ["model"])], observed, inputs)


BUILDERS = {"data": data_suite, "features": features_suite, "codebook": codebook_suite,
            "predictions": predictions_suite}
