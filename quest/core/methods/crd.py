"""crd: contrastive representation distillation with RepDistiller's semantics (student.crd).

- Embedding heads: the student's and the teacher's penultimate features (the input of each net's
  last linear layer) go through a linear layer to `feat_dim` (128) and an L2 normalisation. Both
  heads are trained by the student's optimizer and never exported with the student.
- Memory banks: one per side, N x feat_dim over the training set (N its size), initialised
  uniformly in +-1/sqrt(feat_dim / 3); after each step the rows of the batch's samples become
  normalize(nce_m * row + (1 - nce_m) * embedding) (nce_m 0.5). They are buffers, so the
  Trainer's checkpoint carries them (and the normalisation constants).
- Contrast: each sample's positive is its own row, its `nce_k` (16384) negatives are rows of
  samples of other classes (RepDistiller's "exact" mode), drawn without replacement when the
  other classes hold at least nce_k samples, else with replacement (so on a small subset, e.g.
  10 images a class, every other-class sample appears many times among a sample's negatives, and
  the loss sees few distinct ones). Draws come from a generator on the banks' device seeded with
  (student seed, global step), so a resumed run on that device draws the same negatives without
  carrying RNG state.
- Scores: exp(<row, anchor> / nce_t) / Z (nce_t 0.07): the student's embedding against the
  teacher's bank and the teacher's embedding against the student's. Z is fixed on the first batch
  to the mean score times N, as RepDistiller does.
- NCE loss with the uniform noise distribution Pn = 1 / N: -[log(P_pos / (P_pos + K Pn)) +
  sum over negatives of log(K Pn / (P_neg + K Pn))], batch mean, for both sides, summed.
- loss = CE + 0.8 * CRD (RepDistiller's `-r 1 -a 0 -b 0.8`).

Scores are computed as (anchor @ bank.T) gathered at the drawn indices: N x B products instead of
gathering B x (K + 1) x feat_dim rows (about 1 GB a bank a step at K = 16384 on CPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from quest.core.distill import Batch, Distiller, FrozenTeacher, StepContext
from quest.core.methods import MethodContext, MethodSpec, register
from quest.infra.config import Section
from quest.infra.errors import QuestError

EPS = 1e-7  # RepDistiller's guard in the NCE ratios


class CRDSettings(Section):
    """CRD settings (student.crd): RepDistiller's CIFAR-100 defaults."""

    ce_weight: float = Field(1.0, description="weight of the cross-entropy (RepDistiller -r)")
    weight: float = Field(0.8, description="weight of the CRD term (RepDistiller -b)")
    feat_dim: int = Field(128, gt=0, description="size of the embedding heads' output")
    nce_k: int = Field(16384, gt=0, description=(
        "negatives per sample, from other classes; drawn with replacement when fewer exist"))
    nce_t: float = Field(0.07, gt=0, description="temperature of the contrast scores")
    nce_m: float = Field(0.5, ge=0, le=1, description="momentum of the memory banks' update")


class Embed(nn.Module):
    """Linear to feat_dim, then L2 normalisation per sample."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        """The normalised embedding of the flattened features."""
        return F.normalize(self.linear(x.flatten(1)), dim=1, eps=0.0)


def nce_loss(scores: Tensor, n_data: int) -> Tensor:
    """NCE loss of B x (1 + K) normalised scores (column 0 the positive), batch mean."""
    k = scores.shape[1] - 1
    noise = k / n_data
    pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + EPS))
    neg = torch.log(noise / (scores[:, 1:] + noise + EPS))
    return -(pos.sum() + neg.sum()) / scores.shape[0]


def contrast_scores(anchor: Tensor, bank: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """exp(<bank[idx[b, j]], anchor[b]> / T), B x (1 + K), from (anchor @ bank.T) gathered."""
    dots = anchor @ bank.t()  # B x N
    return torch.exp(dots.gather(1, idx) / temperature)


def contrast_scores_naive(anchor: Tensor, bank: Tensor, idx: Tensor, temperature: float
                          ) -> Tensor:
    """The same scores by gathering the rows (B x (1 + K) x D): RepDistiller's form."""
    rows = bank[idx.flatten()].view(*idx.shape, bank.shape[1])
    return torch.exp(torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / temperature)


class NegativeSampler:
    """Per sample, `k` indices of training samples of other classes ("exact" mode)."""

    def __init__(self, labels: Tensor, k: int) -> None:
        self.labels = labels.cpu().long()
        self.k = k
        classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        # per class: the indices of every sample of the other classes
        self.others = [torch.nonzero(self.labels != c).flatten() for c in range(classes)]
        self._on: dict[torch.device, list[Tensor]] = {}  # the pools copied to each device

    def replaces(self, c: int) -> bool:
        """Whether class c's negatives are drawn with replacement (fewer than k exist)."""
        return self.k > len(self.others[c])

    def _pools(self, device: torch.device) -> list[Tensor]:
        if device not in self._on:
            self._on[device] = [o.to(device) for o in self.others]
        return self._on[device]

    def draw(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """B x k negatives for a batch's labels, drawn on `generator`'s device (on a GPU the
        draw without replacement, a top-k over N random keys a sample, is cheap)."""
        device = generator.device
        labels = labels.to(device).long()
        pools = self._pools(device)
        out = torch.empty(len(labels), self.k, dtype=torch.long, device=device)
        for c in labels.unique().tolist():
            rows = torch.nonzero(labels == c).flatten()
            pool = pools[c]
            if len(pool) == 0:
                raise QuestError("crd: the training set holds one class only: it needs "
                                 "samples of other classes as negatives")
            if self.replaces(c):
                pick = torch.randint(len(pool), (len(rows), self.k), generator=generator,
                                     device=device)
            else:
                # uniform without replacement: the k smallest of independent uniform keys
                keys = torch.rand(len(rows), len(pool), generator=generator, device=device)
                pick = keys.topk(self.k, dim=1, largest=False).indices
            out[rows] = pool[pick]
        return out


def penultimate_linear(model: nn.Module, role: str) -> nn.Linear:
    """The model's last linear layer (its classifier): its input is the penultimate feature."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise QuestError(f"crd: the {role} has no linear classifier to tap its penultimate "
                         "features from")
    return linears[-1]


class _InputTap:
    """Keeps the input of a module's last call (a forward pre-hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.value = args[0]


class CRD(Distiller):
    """ce_weight * CE + weight * (NCE of the student's anchor + NCE of the teacher's)."""

    name = "crd"

    def __init__(self, student: nn.Module, teacher: nn.Module, train_labels: Tensor,
                 settings: CRDSettings, seed: int) -> None:
        super().__init__(student)
        self.teacher = FrozenTeacher(teacher)
        self.settings, self.seed = settings, seed
        s_fc = penultimate_linear(student, "student")
        t_fc = penultimate_linear(teacher, "teacher")
        self.embed_s = Embed(s_fc.in_features, settings.feat_dim)
        self.embed_t = Embed(t_fc.in_features, settings.feat_dim)
        self._s_tap, self._t_tap = _InputTap(s_fc), _InputTap(t_fc)
        self.n_data = len(train_labels)
        stdv = 1.0 / math.sqrt(settings.feat_dim / 3)
        shape = (self.n_data, settings.feat_dim)
        self.register_buffer("memory_s", torch.rand(shape).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(shape).mul_(2 * stdv).add_(-stdv))
        # normalisation constants, fixed on the first batch (-1: not yet)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self.sampler = NegativeSampler(train_labels, settings.nce_k)

    def forward_train(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Not used: CRD needs each sample's index into the training set (`step`)."""
        raise QuestError("crd needs each sample's training-set index: train it through "
                         "Distiller.step(batch, ctx) with a loader that gives Batch.indices")

    def contrast_indices(self, indices: Tensor, labels: Tensor, step: int) -> Tensor:
        """B x (1 + K): each sample's own index, then its negatives for global step `step`
        (drawn on the banks' device, from a generator seeded with the seed and the step)."""
        device = self.memory_s.device
        g = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step)
        neg = self.sampler.draw(labels, g)
        return torch.cat([indices.to(device).long().unsqueeze(1), neg], dim=1)

    def crd_loss(self, f_s: Tensor, f_t: Tensor, indices: Tensor, idx: Tensor) -> Tensor:
        """The two NCE terms of embedded features against the banks, then the banks' update."""
        s = self.settings
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
        out_s = contrast_scores(v_s, self.memory_t, idx, s.nce_t)  # student anchor, teacher bank
        out_t = contrast_scores(v_t, self.memory_s, idx, s.nce_t)  # teacher anchor, student bank
        with torch.no_grad():
            if float(self.z_s) < 0:
                self.z_s.fill_(float(out_s.mean()) * self.n_data)
            if float(self.z_t) < 0:
                self.z_t.fill_(float(out_t.mean()) * self.n_data)
        loss = nce_loss(out_s / self.z_s, self.n_data) + nce_loss(out_t / self.z_t, self.n_data)
        with torch.no_grad():
            # new tensors, not in-place: the scores' backward still needs the old banks
            self.memory_s = self._momentum(self.memory_s, indices, v_s.detach())
            self.memory_t = self._momentum(self.memory_t, indices, v_t.detach())
        return loss

    def _momentum(self, bank: Tensor, indices: Tensor, v: Tensor) -> Tensor:
        m = self.settings.nce_m
        rows = F.normalize(bank[indices] * m + v * (1 - m), dim=1, eps=0.0)
        return bank.index_copy(0, indices, rows)

    def step(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        """Student logits with the weighted CE and CRD terms; updates the memory banks."""
        if batch.indices is None:
            raise QuestError("crd needs each sample's training-set index, and this loader gives "
                             "none: use data.format prepared")
        self.teacher(batch.images)
        assert self._t_tap.value is not None
        f_t = self._t_tap.value.clone()  # out of inference mode
        logits = self.student(batch.images)
        assert self._s_tap.value is not None
        f_s = self._s_tap.value
        indices = batch.indices.to(self.memory_s.device).long()
        idx = self.contrast_indices(batch.indices, batch.labels, ctx.step)
        s = self.settings
        return logits, {
            "ce": s.ce_weight * F.cross_entropy(logits, batch.labels),
            "crd": s.weight * self.crd_loss(f_s, f_t.float(), indices, idx)}

    def export_student(self) -> nn.Module:
        """The plain student (the embedding heads and banks stay behind)."""
        return self.student


def build(ctx: MethodContext) -> CRD:
    """CRD's heads and banks around the student, over the training set's labels."""
    assert ctx.teacher is not None
    if ctx.train_labels is None:
        raise QuestError("crd needs the training set's labels for its memory banks and "
                         "negatives: use data.format prepared")
    return CRD(ctx.student, ctx.teacher, ctx.train_labels, ctx.settings.section("crd", CRDSettings),
               ctx.settings.student.train.seed)


SPEC = register(MethodSpec("crd", build, needs_teacher=True, settings=("crd",),
                           description="contrastive representation distillation (RepDistiller)",
                           owns={"crd": CRDSettings}, loss_terms=("ce", "crd")))
