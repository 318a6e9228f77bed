"""Optional fast paths from runtime settings: bf16 autocast on CUDA, torch.compile, async copies."""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from quest.core.distill import Batch, StepContext, StepFn
from quest.infra.config import Amp
from quest.infra.progress import log

AMP_MODES: tuple[str, ...] = typing.get_args(Amp)

_WARNED: set[str] = set()

def _warn_once(key: str, message: str) -> None:
    """Log a warning the first time `key` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


def amp_enabled(amp: str, device: torch.device | str) -> bool:
    """Whether bf16 autocast applies: runtime.amp is bf16 and the device is CUDA."""
    if amp == "fp32":
        return False
    if torch.device(device).type != "cuda":
        _warn_once("amp-cpu", "runtime.amp: bf16 is only used on CUDA; training on the CPU in "
                   "float32")
        return False
    return True


@contextlib.contextmanager
def autocast(amp: str, device: torch.device | str) -> Iterator[None]:
    """bf16 autocast on CUDA when asked, otherwise nothing (the QuEST softmaxes stay float32)."""
    if amp_enabled(amp, device):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def autocast_step(step: StepFn, amp: str, device: torch.device | str) -> StepFn:
    """Wrap a training step (batch, context) -> (logits, losses) in bf16 autocast when it
    applies."""
    if not amp_enabled(amp, device):
        return step

    def run(batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            return step(batch, ctx)

    return run


def maybe_compile(module: nn.Module, enabled: bool, backend: str = "inductor") -> nn.Module:
    """Compile a module in place with torch.compile (keeps its class and state_dict keys)."""
    if enabled:
        module.compile(backend=backend)
    return module


def describe(runtime: Any, device: torch.device) -> dict[str, Any]:
    """The fast-path settings in effect on `device` (for logs and benchmark records)."""
    return {
        "channels_last": bool(runtime.channels_last),
        "amp": runtime.amp if amp_enabled(runtime.amp, device) else "fp32",
        "compile": bool(runtime.compile),
    }
