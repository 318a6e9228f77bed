"""The numbers gates decide on: `evaluate` against hand-computed accuracies on fixed logits, and
the promotion gate's edges (a tie, exactly min_top1, a missing tag, no challenger alias, the
challenger tie-break) on a real SQLite MLflow registry.

The promotion tests call the gate through its inputs (`_refusal(version, candidate, champion,
champion_top1, min_top1)` and the tags it reads), so a gate on another accuracy (validation
instead of test) changes the tag name here, not the cases."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from quest.core.engine import evaluate
from quest.infra.errors import QuestError

# 8 images, 6 classes; each row's ranking written out so that the expected numbers are
# countable by eye: (logits, label, rank of the label in the row: 1 = top-1)
ROWS = [
    ([9, 1, 2, 3, 4, 5], 0, 1),
    ([1, 9, 2, 3, 4, 5], 1, 1),
    ([1, 2, 9, 3, 4, 5], 0, 6),  # the label has the lowest logit: a top-5 miss too
    ([5, 4, 3, 9, 2, 1], 1, 3),
    ([1, 2, 3, 4, 9, 5], 4, 1),
    ([1, 2, 3, 4, 5, 9], 4, 2),
    ([9, 8, 7, 6, 5, 4], 5, 6),  # top-5 miss
    ([4, 5, 6, 7, 8, 9], 3, 3),
]


class _Batches:
    """Fixed logits in uneven batches (3, 3, 2): the model is the identity."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x = torch.tensor([r[0] for r in ROWS], dtype=torch.float32)
        y = torch.tensor([r[1] for r in ROWS])
        for start in (0, 3, 6):
            yield x[start : start + 3], y[start : start + 3]


def test_evaluate_matches_hand_computed_accuracies() -> None:
    out = evaluate(nn.Identity(), _Batches(), num_classes=6)
    # top-1: rows 0, 1, 4 -> 3/8; top-5: all but rows 2 and 6 -> 6/8
    assert out["top1"] == 3 / 8
    assert out["top5"] == 6 / 8
    assert out["num_images"] == 8
    # per class: 0: rows 0 (hit), 2 (miss) -> 1/2; 1: rows 1 (hit), 3 -> 1/2; 2: no image -> 0;
    # 3: row 7 (miss) -> 0; 4: rows 4 (hit), 5 -> 1/2; 5: row 6 (miss) -> 0
    assert out["per_class"] == [0.5, 0.5, 0.0, 0.0, 0.5, 0.0]
    loss = 0.0
    for logits, label, _ in ROWS:
        loss -= logits[label] - math.log(sum(math.exp(v) for v in logits))
    assert out["loss"] == pytest.approx(loss / 8, rel=1e-6)
    # the rank column above agrees with the counts
    assert sum(r[2] == 1 for r in ROWS) == 3 and sum(r[2] <= 5 for r in ROWS) == 6


def test_evaluate_refuses_an_empty_set() -> None:
    with pytest.raises(QuestError, match="evaluation set is empty"):
        evaluate(nn.Identity(), [], num_classes=6)


# ------------------------------------------------------------------------------------------
# Promotion
# ------------------------------------------------------------------------------------------


def test_the_gate_refuses_a_tie_and_accepts_exactly_min_top1() -> None:
    from quest.apps.tracking.promotion import _refusal

    # a tie with the champion is not an improvement
    assert "does not beat" in str(_refusal(3, 0.5, 2, 0.5, 0.0))
    # exactly at the bar clears it (the bar is inclusive), and beats a worse champion
    assert _refusal(3, 0.5, 2, 0.4, 0.5) is None
    assert _refusal(3, 0.5, None, None, 0.5) is None  # the first champion
    assert "below min_top1" in str(_refusal(3, 0.5 - 1e-9, None, None, 0.5))
    assert "already the champion" in str(_refusal(2, 0.9, 2, 0.9, 0.0))


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A fresh SQLite registry with model `m`: versions 1..3 tagged val_top1 0.5, 0.5, 0.7 (what
    choices read) and test_top1 in the opposite order (reported only: it must not decide)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri, uri)
    client.create_registered_model("m")
    for val, test in ((0.5, 0.9), (0.5, 0.8), (0.7, 0.1)):
        mv = client.create_model_version("m", source=str(tmp_path / "artifacts"))
        client.set_model_version_tag("m", mv.version, "val_top1", str(val))
        client.set_model_version_tag("m", mv.version, "test_top1", str(test))
    yield {"uri": uri, "client": client}
    mlflow.set_tracking_uri(None)


def test_promotion_edges_on_a_real_registry(registry: dict[str, Any]) -> None:
    from quest.apps.tracking.promotion import promote
    from quest.apps.tracking.registry import set_alias

    uri, client = registry["uri"], registry["client"]
    with pytest.raises(QuestError, match="has no 'challenger' alias"):
        promote(uri, model_name="m")  # nothing registered by quest track yet
    first = promote(uri, model_name="m", version=1)
    assert first["promoted"] and first["previous_champion"] is None
    tie = promote(uri, model_name="m", version=2)  # 0.5 against 0.5
    assert not tie["promoted"] and "does not beat" in tie["reason"]
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    at_bar = promote(uri, model_name="m", version=3, min_top1=0.7)
    assert at_bar["promoted"] and at_bar["previous_champion"] == 1
    client.delete_model_version_tag("m", "2", "val_top1")
    set_alias(client, "m", "challenger", 2)
    with pytest.raises(QuestError, match="no numeric val_top1 tag"):
        promote(uri, model_name="m")


def test_the_challenger_is_the_best_student_and_the_first_listed_wins_a_tie(
        registry: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from quest.apps.tracking import mlflow_log
    from quest.apps.tracking import registry as reg

    monkeypatch.setattr(reg, "STUDENT_MODEL", "m")
    client = registry["client"]
    out = mlflow_log._set_challenger(client, ["kd", "ce"], {"kd": 2, "ce": 1})
    # 0.5 = 0.5 on val (test 0.8 against 0.9 is not read): kd is listed first
    assert (out["challenger"]["method"], out["challenger"]["version"]) == ("kd", 2)
    assert str(client.get_model_version_by_alias("m", "challenger").version) == "2"
    out = mlflow_log._set_challenger(client, ["ce", "kd", "quest"], {"ce": 1, "kd": 2, "quest": 3})
    assert out["challenger"]["method"] == "quest"  # 0.7 on val beats both (its test is 0.1)
