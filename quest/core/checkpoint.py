"""Checkpoints: atomic saves, weights-only loads, and strict imports that explain mismatches."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quest.infra.errors import QuestError
from quest.infra.io_utils import atomic_path


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Save a checkpoint dict atomically (temporary file, then rename)."""
    # serialised to memory first: torch names the archive's records after a path it is given
    # (the temporary name is random, so identical weights would hash differently), and it turns
    # a failing file write into a RuntimeError; a plain write raises OSError (e.g. ENOSPC),
    # which atomic_path reports in one line
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(buf.getbuffer())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers, never code."""
    p = Path(path)
    if not p.is_file():
        raise QuestError(f"checkpoint {p} does not exist: check the path in params.yaml")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise QuestError(
            f"checkpoint {p} holds more than weights and was refused ({first[:120]}): "
            "re-save it as a plain state_dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise QuestError(
            f"checkpoint {p} cannot be read ({type(exc).__name__}): it may be truncated; "
            "delete or replace it"
        ) from None
    if not isinstance(obj, dict):
        raise QuestError(f"checkpoint {p} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def extract_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state_dict of a bare state_dict or of a dict holding one (RepDistiller: 'model')."""
    for key in ("model", "state_dict", "net"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(
            isinstance(v, torch.Tensor) for v in inner.values()
        ):
            obj = inner
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise QuestError("checkpoint holds no tensors: expected a state_dict or {'model': ...}")
    # DataParallel / DDP checkpoints prefix every key with 'module.'
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _preview(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `model`, raising one line that lists every kind of mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {_preview(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_preview(shapes)}")
    if problems:
        raise QuestError(
            f"{what} does not fit {type(model).__name__}: {'; '.join(problems)}: "
            "check the arch setting and the number of classes"
        )
    merged = {**own, **{k: v for k, v in state.items() if k in own}}
    model.load_state_dict(merged, strict=True)


def save_model_file(
    path: str | os.PathLike[str], model: nn.Module, **meta: Any
) -> None:
    """Save a deployable model file: its state_dict under 'model' plus plain metadata."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    save_checkpoint(path, {"model": state, **meta})


def load_model_file(path: Path, what: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by save_model_file (arch and num_classes come from its metadata)."""
    if not path.is_file():
        raise QuestError(f"{what} {path} does not exist: run the stage that makes it first")
    from quest.core.models.zoo import build_model  # the zoo's builders; checkpoints stay model-free

    obj = load_checkpoint(path)
    model = build_model(str(obj["arch"]), int(obj["num_classes"]))
    load_state_strict(model, extract_state_dict(obj), f"{what} {path}")
    meta = {k: v for k, v in obj.items() if k != "model"}
    return model, meta
