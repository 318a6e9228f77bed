"""Loss functions: cross-entropy, Hinton KD and the QuEST visual-word objective."""

from __future__ import annotations

import math
import typing

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quest.core.fused_quest import fused_quest_kl
from quest.infra.config import Predictor
from quest.infra.errors import QuestError


def soft_assign(features: Tensor, codebook: Tensor, temperature: float) -> Tensor:
    """Soft-assign every spatial feature vector to the visual words of a codebook.

    Returns probabilities ``[B, H, W, K]`` with ``p[b, h, w, k] = softmax_k(-T * ||f - c_k||^2)``.
    The squared distance is expanded as ``||f||^2 + ||c||^2 - 2 f.c`` so that only one
    ``(B*H*W) x K`` matrix product is formed, never a ``B*H*W*K*C`` tensor.

    Example:
        >>> f = torch.randn(2, 64, 8, 8); words = torch.randn(16, 64)
        >>> p = soft_assign(f, words, temperature=5.0)
        >>> p.shape, bool(torch.allclose(p.sum(-1), torch.ones(2, 8, 8)))
        (torch.Size([2, 8, 8, 16]), True)
    """
    logits = assignment_logits(features, codebook, temperature)
    return logits.softmax(dim=-1)


def assignment_logits(features: Tensor, codebook: Tensor, temperature: float) -> Tensor:
    """Return ``-T * ||f - c_k||^2`` for every position and word, shaped ``[B, H, W, K]``."""
    if features.dim() != 4:
        raise QuestError(f"features must be B x C x H x W, got shape {tuple(features.shape)}")
    b, c, h, w = features.shape
    if codebook.dim() != 2 or codebook.shape[1] != c:
        raise QuestError(
            f"codebook of shape {tuple(codebook.shape)} does not match {c}-channel features: "
            "refit the codebook on this teacher layer"
        )
    flat = features.permute(0, 2, 3, 1).reshape(-1, c).to(codebook.dtype)
    f_sq = flat.pow(2).sum(dim=1, keepdim=True)
    c_sq = codebook.pow(2).sum(dim=1)
    # one GEMM gives -T * (||f||^2 + ||c||^2 - 2 f.c) directly (addmm: beta*input + alpha*f.c)
    logits = torch.addmm((f_sq + c_sq).mul_(-temperature), flat, codebook.t(),
                         beta=1.0, alpha=2.0 * temperature)
    return logits.reshape(b, h, w, -1)


# the choices of student.quest.predictor (the settings schema's `Predictor` type)
PREDICTORS: tuple[str, ...] = typing.get_args(Predictor)


class CosinePredictor(nn.Module):
    """A 1x1 cosine-similarity convolution that scores every student position against K words.

    Input vectors and weight rows are L2-normalised and their dot product is multiplied by a
    scale. Weights are drawn from N(0, sqrt(2 / in_channels)). Two variants, as in the official
    code: ``learned_scale`` (the CIFAR configs: a learnable scalar scale, no bias) and
    ``fixed_scale_bias`` (the few-images transfer configs: a constant scale plus a learnable
    per-word bias, initialised to zero).

    Example:
        >>> pred = CosinePredictor(in_channels=64, num_words=16)
        >>> pred(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(self, in_channels: int, num_words: int, init_scale: float = 3.0,
                 variant: str = "learned_scale") -> None:
        super().__init__()
        if variant not in PREDICTORS:
            raise QuestError(f"unknown QuEST predictor '{variant}': choose one of "
                             f"{', '.join(PREDICTORS)}")
        self.variant = variant
        self.weight = nn.Parameter(torch.empty(num_words, in_channels))
        nn.init.normal_(self.weight, mean=0.0, std=math.sqrt(2.0 / in_channels))
        self.bias: nn.Parameter | None
        if variant == "learned_scale":
            self.scale = nn.Parameter(torch.tensor(float(init_scale)))
            self.bias = None
        else:
            self.register_buffer("scale", torch.tensor(float(init_scale)))
            self.bias = nn.Parameter(torch.zeros(num_words))

    def scaled_weight(self) -> Tensor:
        """The K x C matrix scale * normalised rows (the scale folds into the small weight)."""
        return self.scale * F.normalize(self.weight, p=2, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Return scores ``[B, K, H, W]`` = scale * cos(x_position, w_k) (+ bias_k)."""
        b, c, h, w = x.shape
        flat = F.normalize(x.permute(0, 2, 3, 1).reshape(-1, c), p=2, dim=1)
        scores = flat @ self.scaled_weight().t()
        if self.bias is not None:
            scores = scores + self.bias
        # a [B, K, H, W] view of position-major memory: per-position softmaxes stay contiguous
        return scores.view(b, h, w, -1).permute(0, 3, 1, 2)


def quest_kl(student_scores: Tensor, teacher_probs: Tensor) -> tuple[Tensor, Tensor]:
    """KL(p_T || p_S) per position averaged over all positions, and the visual-word accuracy.

    ``student_scores`` is ``[B, K, H, W]`` (predictor output, pre-softmax); ``teacher_probs`` is
    ``[B, H, W, K]``. Positions with ``p_T = 0`` contribute nothing (0 log 0 = 0).
    """
    k = student_scores.shape[1]
    scores = student_scores.permute(0, 2, 3, 1).reshape(-1, k)
    p_t = teacher_probs.reshape(-1, k).to(scores.dtype)
    with torch.no_grad():
        neg_entropy = torch.xlogy(p_t, p_t).sum(dim=-1)
        accuracy = (scores.argmax(dim=-1) == p_t.argmax(dim=-1)).float().mean()
    # KL = sum p_T log p_T - sum p_T s + logsumexp(s): fewer passes over the N x K scores than
    # materialising log p_S, and the same value
    kl = neg_entropy - (p_t * scores).sum(dim=-1) + torch.logsumexp(scores, dim=-1)
    return kl.mean(), accuracy


def pool_teacher_map(features: Tensor, pool: int) -> Tensor:
    """Average-pool a teacher map with kernel = stride = `pool` (the official "downscale").

    The features stage applies it before k-means and the QuEST loss at training time, so the
    codebook is fit on the very vectors it later assigns."""
    if pool == 1:
        return features
    h, w = features.shape[-2:]
    if h < pool or w < pool:
        raise QuestError(f"the teacher map is {h}x{w}, smaller than features.pool = {pool}: "
                         "lower features.pool or tap an earlier teacher layer")
    return F.avg_pool2d(features, pool)


def match_spatial(teacher: Tensor, student: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool a student map larger than the teacher's down to the teacher's size.

    A teacher map larger than the student's is refused: the codebook was fit on the teacher's
    vectors as the features stage saw them, and pooling them further here would assign
    vectors k-means never saw (set features.pool so that both stages pool alike)."""
    th, tw = teacher.shape[-2:]
    sh, sw = student.shape[-2:]
    if (th, tw) == (sh, sw):
        return teacher, student
    if th >= sh and tw >= sw:
        hint = (f"set features.pool: {th // sh}" if th % sh == 0 and tw % sw == 0
                and th // sh == tw // sw else "tap layers whose sizes divide")
        raise QuestError(
            f"teacher map {th}x{tw} is larger than the student's {sh}x{sw}, and the codebook is "
            f"fit on unpooled teacher vectors: {hint} (pools before k-means and in training alike)"
        )
    if sh >= th and sw >= tw:
        return teacher, F.adaptive_avg_pool2d(student, (th, tw))
    raise QuestError(
        f"teacher map {th}x{tw} and student map {sh}x{sw} cannot be pooled to one size: "
        "choose layers whose maps nest (set features.layer / student.layer)"
    )


class QuestLoss(nn.Module):
    """The QuEST objective: the student predicts the teacher's soft visual-word assignments.

    Holds the frozen codebook (a buffer, never trained) and the trainable cosine predictor that
    maps student channels to K words. ``forward`` returns ``(loss, word_accuracy)`` where the
    loss is KL(p_T || p_S) averaged over all B*H*W positions.

    Example:
        >>> words = torch.randn(16, 64)
        >>> crit = QuestLoss(words, student_channels=32, temperature=5.0)
        >>> loss, acc = crit(torch.randn(2, 32, 8, 8), torch.randn(2, 64, 8, 8))
        >>> loss.dim(), 0.0 <= float(acc) <= 1.0
        (0, True)
    """

    def __init__(
        self,
        codebook: Tensor,
        student_channels: int,
        temperature: float = 5.0,
        init_scale: float = 3.0,
        predictor: str = "learned_scale",
    ) -> None:
        super().__init__()
        self.register_buffer("codebook", torch.as_tensor(codebook, dtype=torch.float32).clone())
        self.temperature = float(temperature)
        self.predictor = CosinePredictor(student_channels, self.codebook.shape[0], init_scale,
                                         predictor)

    def targets(self, teacher_features: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """Teacher soft assignments ``[B, H, W, K]``, pooled to ``size`` first when given."""
        with torch.no_grad():
            feats = teacher_features.detach().to(self.codebook.dtype)
            if size is not None and tuple(feats.shape[-2:]) != tuple(size):
                feats = F.adaptive_avg_pool2d(feats, size)
            return soft_assign(feats, self.codebook, self.temperature)

    def from_targets(
        self, student_features: Tensor, teacher_probs: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Loss and word accuracy of the student against precomputed teacher assignments."""
        scores = self.predictor(student_features.to(self.codebook.dtype))
        return quest_kl(scores, teacher_probs)

    def terms(self, student_features: Tensor, teacher_features: Tensor) -> dict[str, Tensor]:
        """Loss, word accuracy and teacher assignment statistics, by the fused chunked path."""
        teacher_features, student_features = match_spatial(teacher_features, student_features)
        c_s, c_t = student_features.shape[1], teacher_features.shape[1]
        if self.codebook.shape[1] != c_t:
            raise QuestError(
                f"codebook has {self.codebook.shape[1]} channels but the teacher layer has {c_t}: "
                "refit the codebook on this teacher layer"
            )
        dtype = self.codebook.dtype  # float32 even under autocast: the softmaxes need it
        student = F.normalize(
            student_features.to(dtype).permute(0, 2, 3, 1).reshape(-1, c_s), p=2, dim=1)
        teacher = teacher_features.detach().to(dtype).permute(0, 2, 3, 1).reshape(-1, c_t)
        pred = self.predictor
        loss, acc, mean_max, usage, student_max = fused_quest_kl(
            student, pred.scaled_weight(), teacher, self.codebook, self.temperature, pred.bias)
        perplexity = distribution_perplexity(usage)
        # diagnostics of whether the word task is learned: how peaked the targets are, how
        # peaked the predictions are, and the scale that bounds how peaked they can get
        return {"loss": loss, "word_accuracy": acc, "mean_max_assignment": mean_max,
                "teacher_perplexity": perplexity, "student_mean_max": student_max,
                "predictor_scale": pred.scale.detach().clone()}

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(loss, word_accuracy)`` for student and teacher feature maps."""
        out = self.terms(student_features, teacher_features)
        return out["loss"], out["word_accuracy"]


def assignment_stats(teacher_probs: Tensor) -> dict[str, Tensor]:
    """Mean max assignment and perplexity of the mean word distribution (device tensors)."""
    with torch.no_grad():
        flat = teacher_probs.reshape(-1, teacher_probs.shape[-1]).float()
        mean_max = flat.max(dim=-1).values.mean()
    return {"mean_max_assignment": mean_max,
            "teacher_perplexity": distribution_perplexity(flat.mean(dim=0))}


def distribution_perplexity(p: Tensor) -> Tensor:
    """exp(entropy) of a probability vector: K if uniform over K words, 1 if one word."""
    with torch.no_grad():
        return torch.exp(-torch.xlogy(p, p).sum())


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch."""
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_ps, p_t, reduction="batchmean") * temperature**2
