"""Data-parallel student training with torch.distributed, one process per device (torchrun).

Every rank draws the same global batch (the loaders are seeded by seed and epoch) and trains on
its contiguous 1/world slice; DistributedDataParallel averages the gradients, and BatchNorm
statistics are computed over the global batch (SyncBatchNorm on CUDA; GlobalBatchNorm2d on the
CPU, where torch's SyncBatchNorm refuses to run), so N ranks take the same SGD steps as one
process with the same batch size. Rank 0 alone writes checkpoints and outputs.

    torchrun --nproc_per_node 4 -m quest student --method quest
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m quest student
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from quest.core.distill import Batch, StepContext
from quest.infra.errors import QuestError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the only one that writes files."""
        return self.rank == 0


def env_info() -> DistInfo | None:
    """The torchrun job this process belongs to (WORLD_SIZE > 1), or None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun job."""
    info = env_info()
    return info is None or info.is_main


def init(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU) once; return this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(shutdown)
    return device


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch of every rank.

    Works on any backend and device (gloo on CPU included). Mean and variance come from two
    autograd-aware all-reduces (sum and count, then centred squares), so the gradients are those
    of BatchNorm over the concatenated batch; running statistics are updated as BatchNorm does.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalise with global batch statistics in training, running statistics otherwise."""
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = x.new_full((1,), float(x.numel() // c))
        total = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), count]))
        n = total[c]
        mean = total[:c] / n
        centred = x - mean.view(1, -1, 1, 1)
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / n
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None and self.running_var is not None
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(unbiased, factor)
        return out


def _to_global_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below `module` by a GlobalBatchNorm2d sharing its tensors."""
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        out = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global_bn(child))
    return out


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch: torch's SyncBatchNorm on CUDA, GlobalBatchNorm2d else."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_bn(module)


class ShardedLoader:
    """Yields this rank's contiguous slice of every global batch of a loader: of the images,
    the labels and (training loaders) the samples' indices alike."""

    def __init__(self, loader: Any, rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size
        last = getattr(loader, "last_batch", None)
        if last is not None and last % world_size:
            # a kept partial last batch (train.drop_last false) must split too: say so before
            # the first epoch rather than at its end
            raise QuestError(f"an epoch's last batch of {last} images does not split over "
                             f"{world_size} ranks: set train.drop_last true, or a batch size "
                             "or repeat that leaves a multiple of the ranks")

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        # set_epoch, num_samples, ... of the wrapped loader
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for batch in self.loader:
            per = _check_split(len(batch[1]), self.world_size)
            lo = self.rank * per
            yield tuple(t[lo : lo + per] for t in batch)


def _check_split(batch: int, world_size: int) -> int:
    """A global batch's share per rank; a QuestError when it does not split evenly."""
    per, rest = divmod(batch, world_size)
    if rest:
        raise QuestError(f"a batch of {batch} does not split over {world_size} ranks: make "
                         "train.batch_size a multiple of the number of ranks")
    return per


class _TrainStep(nn.Module):
    """Module view of `distiller.step`, for DistributedDataParallel to wrap."""

    def __init__(self, distiller: nn.Module) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and losses of one training step (this rank's share of the batch)."""
        return self.distiller.step(batch, ctx)  # type: ignore[operator]


def data_parallel(distiller: Any, device: torch.device, train_loader: Any, info: DistInfo,
                  batch_size: int, presharded: bool = False) -> tuple[nn.Module, Any]:
    """Make a distiller's training data-parallel over the job's ranks: the step function to
    give the Trainer (`step=`, with `is_main=info.is_main, graceful_stop=False`) and the rank's
    sharded loader (`train_loader` itself when it already reads only this rank's share)."""
    if batch_size % info.world_size:
        raise QuestError(f"train.batch_size {batch_size} does not split over {info.world_size} "
                         "ranks: make it a multiple of the number of processes")
    distiller.to(device)
    distiller.student = sync_batchnorm(distiller.student, device)
    cuda = device.type == "cuda"
    # buffers (BatchNorm running statistics) stay identical through the global statistics, so
    # they need no broadcast per step; the initial sync copies rank 0's state to every rank
    ddp = nn.parallel.DistributedDataParallel(
        _TrainStep(distiller), device_ids=[device] if cuda else None,
        broadcast_buffers=False)
    return ddp, train_loader if presharded else ShardedLoader(train_loader, info.rank,
                                                              info.world_size)
