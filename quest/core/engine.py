"""The training and evaluation loops, with per-epoch checkpoints and resume."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quest.core.checkpoint import load_checkpoint, save_checkpoint
from quest.core.distill import Batch, Distiller, StepContext, StepFn
from quest.infra.config import OptimConfig
from quest.infra.errors import QuestError
from quest.infra.progress import log, track


def lr_at(opt: OptimConfig, epoch: float) -> float:
    """Learning rate at a (fractional) epoch for the step, cosine or one-cycle schedule."""
    if opt.schedule == "step":
        drops = sum(1 for m in opt.milestones if epoch >= m)
        return opt.lr * opt.gamma**drops
    frac = min(max(epoch / opt.epochs, 0.0), 1.0)
    if opt.schedule == "cosine":
        return opt.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    # one-cycle: linear warm-up from lr/25, then cosine annealing to ~0
    warm = opt.warmup_fraction
    if frac < warm:
        return opt.lr * (0.04 + 0.96 * frac / warm)
    return opt.lr * 0.5 * (1.0 + math.cos(math.pi * (frac - warm) / max(1.0 - warm, 1e-8)))


def make_optimizer(params: Iterable[nn.Parameter], opt: OptimConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay as the recipe says."""
    return torch.optim.SGD(
        list(params),
        lr=opt.lr,
        momentum=opt.momentum,
        nesterov=opt.nesterov and opt.momentum > 0,
        weight_decay=opt.weight_decay,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, ...]],
    num_classes: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Top-1, top-5, mean loss and per-class accuracy of `model` over `loader`."""
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), device=device)
    correct5 = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    per_class_hit = torch.zeros(num_classes, device=device)
    per_class_n = torch.zeros(num_classes, device=device)
    n = 0
    with torch.inference_mode():
        for x, y, *_ in loader:  # a training loader's batches also carry sample indices
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            top = logits.topk(min(5, num_classes), dim=1).indices
            hit1 = top[:, 0] == y
            correct1 += hit1.sum()
            correct5 += (top == y[:, None]).any(dim=1).sum()
            per_class_hit.index_add_(0, y, hit1.float())
            per_class_n.index_add_(0, y, torch.ones_like(y, dtype=torch.float))
            n += len(y)
    model.train(was_training)
    if n == 0:
        raise QuestError("evaluation set is empty: check the prepared test split")
    per_class = (per_class_hit / per_class_n.clamp(min=1)).tolist()
    return {
        "top1": float(correct1) / n,
        "top5": float(correct5) / n,
        "loss": float(loss_sum) / n,
        "per_class": per_class,
        "num_images": n,
    }


@dataclass
class EpochState:
    """A training epoch's running sums, kept on the device (no host sync inside a step) and
    saved in a mid-epoch checkpoint, so a resumed epoch reports what an uninterrupted one does."""

    sums: dict[str, Tensor]
    correct: Tensor
    seen: int
    earlier_seconds: float  # spent before a resume
    started: float  # perf_counter when this process began the epoch

    @classmethod
    def fresh(cls, device: torch.device) -> EpochState:
        """An epoch about to start."""
        return cls({}, torch.zeros((), device=device), 0, 0.0, time.perf_counter())

    @classmethod
    def restore(cls, saved: dict[str, Any], device: torch.device) -> EpochState:
        """An epoch resumed from the partial state of a checkpoint."""
        return cls({k: v.to(device) for k, v in saved["sums"].items()},
                   saved["correct"].to(device), int(saved["seen"]), float(saved["seconds"]),
                   time.perf_counter())

    def add(self, terms: dict[str, Tensor], logits: Tensor, y: Tensor) -> None:
        """One batch: every named loss and monitor, weighted by the batch size."""
        bs = len(y)
        self.seen += bs
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float() * bs
        self.correct += (logits.detach().argmax(dim=1) == y).sum()

    def means(self) -> dict[str, float]:
        """Per-sample means of the summed terms (one host sync, at the epoch's end)."""
        return {k: float(v) / self.seen for k, v in self.sums.items()}

    def elapsed(self) -> float:
        """Seconds spent on the epoch, across a resume."""
        return self.earlier_seconds + time.perf_counter() - self.started

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint form (CPU tensors)."""
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()},
                "correct": self.correct.detach().cpu(), "seen": self.seen,
                "seconds": self.elapsed()}


class Trainer:
    """Runs epochs of a distiller with SGD, checkpointing after every epoch and resuming.

    SIGINT/SIGTERM during `fit` (main thread) asks for a stop: the running step finishes, a
    mid-epoch checkpoint records the step reached, the epoch's partial metric sums and the RNG
    state, and KeyboardInterrupt is raised. The next `fit` redraws (and skips) the batches that
    epoch already consumed, so the resumed run reaches the same weights as an uninterrupted one.
    """

    def __init__(
        self,
        distiller: Distiller,
        opt: OptimConfig,
        *,
        checkpoint_path: str | os.PathLike[str],
        fingerprint: str,
        device: torch.device | str = "cpu",
        num_classes: int,
        progress: str = "auto",
        desc: str = "train",
        step: StepFn | None = None,
        is_main: bool = True,
        graceful_stop: bool = True,
    ) -> None:
        self.distiller = distiller.to(device)
        self.opt = opt
        self.checkpoint_path = Path(checkpoint_path)
        self.fingerprint = fingerprint
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.progress = progress
        self.desc = desc
        self.optimizer = make_optimizer(distiller.trainable_parameters(), opt)
        # one training step, (Batch, StepContext) -> (logits, named losses): the distiller's own,
        # or what the caller built around it (quest.core.fastpath's bf16 autocast,
        # quest.core.distributed's DDP wrapper); `is_main`: this process writes checkpoints
        # (rank 0 of a torchrun job)
        self.forward_step: StepFn = step if step is not None else distiller.step
        self.is_main = is_main
        # a stop between steps needs every rank to stop at the same step; under torchrun the
        # ranks see a signal at different steps, so there a signal stops at once instead (the
        # last epoch checkpoint stays) rather than leaving the others waiting in a collective
        self.graceful_stop = graceful_stop
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.start_step = 0  # batches of epoch `start_epoch` already trained (mid-epoch resume)
        self._partial: dict[str, Any] | None = None
        self._rng: dict[str, Tensor] | None = None
        self._stop_requested = False

    def _rng_state(self) -> dict[str, Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _state(
        self, epoch: int, step: int = 0, partial: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        state = {
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "step": step,
            "distiller": {
                k: v for k, v in self.distiller.state_dict().items() if not k.startswith("teacher.")
            },
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            # the global RNG feeds dropout and DataLoader-path augmentation: restoring it makes a
            # resumed run draw what the uninterrupted one would have drawn
            "rng": self._rng_state(),
        }
        if partial is not None:
            state["partial"] = partial
        return state

    @contextlib.contextmanager
    def _stop_on_signal(self) -> Iterator[None]:
        """Turn SIGINT/SIGTERM into a stop request honoured between steps (main thread only)."""
        self._stop_requested = False
        if not self.graceful_stop or threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only; a thread's trainer cannot be interrupted
            return

        def request(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt  # a second signal: stop at once, the last checkpoint stays
            # a KeyboardInterrupt raised inside optimizer.step() could leave the weights half
            # updated; a flag lets the step finish so that the checkpoint is consistent
            self._stop_requested = True

        sigs = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.getsignal(s) for s in sigs}
        for s in sigs:
            signal.signal(s, request)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def resume(self) -> bool:
        """Load the last checkpoint if it belongs to this very run configuration."""
        if not self.checkpoint_path.is_file():
            return False
        state = load_checkpoint(self.checkpoint_path)
        if state.get("fingerprint") != self.fingerprint:
            log.info("%s: checkpoint %s is from other settings; starting afresh",
                     self.desc, self.checkpoint_path)
            return False
        missing, unexpected = self.distiller.load_state_dict(state["distiller"], strict=False)
        if unexpected or any(not k.startswith("teacher.") for k in missing):
            raise QuestError(
                f"checkpoint {self.checkpoint_path} does not fit this run: delete it to start over"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        self.start_epoch = int(state["epoch"])
        self.start_step = int(state.get("step", 0))
        self._partial = state.get("partial")
        self._rng = state.get("rng")
        within = f" and step {self.start_step} of epoch {self.start_epoch + 1}" * bool(
            self.start_step)
        log.info("%s: resuming after epoch %d%s from %s", self.desc, self.start_epoch, within,
                 self.checkpoint_path)
        return True

    def _restore_rng(self) -> None:
        if self._rng is None:
            return
        torch.set_rng_state(self._rng["cpu"])
        if "cuda" in self._rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(self._rng["cuda"], self.device)
        self._rng = None

    def fit(
        self,
        train_loader: Any,
        test_loader: Any,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Train until `opt.epochs`, evaluating and checkpointing after each epoch."""
        self.resume()
        steps = len(train_loader)
        if steps == 0:
            raise QuestError(
                f"{self.desc}: fewer training images than one batch: lower the batch_size"
            )
        if self.start_step >= steps:
            raise QuestError(
                f"checkpoint {self.checkpoint_path} stopped at step {self.start_step} of an epoch "
                f"that now has {steps}: delete it to start over"
            )
        with self._stop_on_signal():
            return self._fit(train_loader, test_loader, steps, on_epoch)

    def _fit(
        self,
        train_loader: Any,
        test_loader: Any,
        steps: int,
        on_epoch: Callable[[dict[str, Any]], None] | None,
    ) -> list[dict[str, Any]]:
        for epoch in range(self.start_epoch, self.opt.epochs):
            self.distiller.train()
            train_loader.set_epoch(epoch)
            skip = self.start_step if epoch == self.start_epoch else 0
            state = (EpochState.restore(self._partial, self.device) if skip and self._partial
                     else EpochState.fresh(self.device))
            self._train_epoch(train_loader, epoch, steps, skip, state)
            record = self._epoch_record(epoch, steps, state, test_loader)
            self.history.append(record)
            if self.is_main:
                save_checkpoint(self.checkpoint_path, self._state(epoch + 1))
            log.info(
                "%s epoch %d/%d loss %.4f train %.4f test %.4f lr %.4g (%.1fs)",
                self.desc, epoch + 1, self.opt.epochs, record["loss"],
                record["train_accuracy"], record["test_accuracy"], record["lr"],
                record["seconds"],
            )
            if on_epoch is not None:
                on_epoch(record)
            if self._stop_requested:
                log.info("%s: interrupted after epoch %d; checkpoint %s", self.desc, epoch + 1,
                         self.checkpoint_path)
                raise KeyboardInterrupt
        return self.history

    def _train_epoch(self, train_loader: Any, epoch: int, steps: int, skip: int,
                     state: EpochState) -> None:
        """SGD steps `skip`..`steps` of `epoch`, summed into `state` (a stop request saves it
        mid-epoch and raises KeyboardInterrupt)."""
        seek = getattr(train_loader, "start_at", None)
        if skip and seek is not None:
            seek(skip)  # a loader seeded per sample starts after the trained batches
        batches = iter(track(train_loader, steps, f"{self.desc} {epoch + 1}/{self.opt.epochs}",
                             self.progress))
        if seek is None:
            # redraw the batches the interrupted run consumed, so that the loader's random
            # stream (shuffle, crops, flips) is where it was; their results are discarded
            for _ in range(skip):
                next(batches)
        self._restore_rng()
        epochs = self.opt.epochs
        for i, item in enumerate(batches, start=skip):
            lr = lr_at(self.opt, epoch + i / steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            # (images, labels, indices) from the training loaders; a plain (images, labels)
            # iterable gives indices None
            batch = Batch.of(item)
            ctx = StepContext(epoch, epochs, epoch * steps + i, epochs * steps)
            logits, losses = self.forward_step(batch, ctx)
            total = torch.stack(list(losses.values())).sum()
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            state.add({**losses, "loss": total, **self.distiller.monitors}, logits, batch.labels)
            if self._stop_requested and i + 1 < steps:
                self._save_partial(epoch, i + 1, state)
                raise KeyboardInterrupt

    def _epoch_record(self, epoch: int, steps: int, state: EpochState,
                      test_loader: Any) -> dict[str, Any]:
        """The epoch's means, accuracy, learning rate and test metrics (a NaN loss stops)."""
        record: dict[str, Any] = {"epoch": epoch + 1, **state.means()}
        if not math.isfinite(record["loss"]):
            kept = (f"the last good checkpoint stays in {self.checkpoint_path}"
                    if self.checkpoint_path.is_file() else "no checkpoint kept")
            raise QuestError(
                f"{self.desc}: loss became {record['loss']} in epoch {epoch + 1} ({kept}): "
                "lower the learning rate (train.lr) and rerun"
            )
        record["lr"] = lr_at(self.opt, epoch + (steps - 1) / steps)
        record["train_accuracy"] = float(state.correct) / state.seen
        record["train_images_per_s"] = state.seen / state.elapsed()
        ev = evaluate(self.distiller, test_loader, self.num_classes, self.device)
        record["test_accuracy"] = ev["top1"]
        record["test_top5"] = ev["top5"]
        record["test_loss"] = ev["loss"]
        record["seconds"] = state.elapsed()
        return record

    def _save_partial(self, epoch: int, step: int, state: EpochState) -> None:
        """Checkpoint `step` batches into `epoch`, unless the loss already went non-finite."""
        if not math.isfinite(float(state.sums["loss"])):
            log.info("%s: interrupted with a non-finite loss; the last good checkpoint stays",
                     self.desc)
            return
        if self.is_main:
            save_checkpoint(self.checkpoint_path, self._state(epoch, step, state.to_dict()))
        log.info("%s: interrupted at step %d of epoch %d; checkpoint %s", self.desc, step,
                 epoch + 1, self.checkpoint_path)

    def finish(self) -> None:
        """Drop the resume checkpoint once the final outputs are safely written."""
        if self.is_main:
            self.checkpoint_path.unlink(missing_ok=True)
