"""Teacher-side pooling (features.pool, the official "downscale") and reflect padding: the
codebook is fit on the very teacher vectors the QuEST loss later assigns, and the crop padding
mode is a setting that both loaders honour."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quest.core.losses import QuestLoss, match_spatial, pool_teacher_map
from quest.core.methods.quest import Quest
from quest.core.models.taps import FeatureTap
from quest.core.models.zoo import build_model
from quest.infra.config import load_config
from quest.infra.errors import QuestError
from quest.infra.io_utils import read_json
from quest.infra.paths import Paths

REPO = Path(__file__).resolve().parents[1]


def test_pool_teacher_map_is_2x2_average_pooling() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    pooled = pool_teacher_map(x, 2)
    # an independent formulation: the mean of each 2x2 block
    blocks = x.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))
    assert pooled.shape == (2, 3, 2, 2)
    torch.testing.assert_close(pooled, blocks)
    assert pool_teacher_map(x, 1) is x
    with pytest.raises(QuestError, match="smaller than features.pool"):
        pool_teacher_map(x, 8)


def test_teacher_larger_than_student_is_refused_with_the_pool_to_set() -> None:
    t, s = torch.randn(2, 8, 8, 8), torch.randn(2, 4, 4, 4)
    with pytest.raises(QuestError) as err:
        match_spatial(t, s)
    assert "features.pool: 2" in str(err.value) and "\n" not in str(err.value)
    # a larger student map is still pooled down to the teacher's (the codebook is untouched)
    t2, s2 = match_spatial(torch.randn(2, 8, 4, 4), torch.randn(2, 4, 8, 8))
    assert t2.shape[-2:] == s2.shape[-2:] == (4, 4)


def test_quest_pools_the_teacher_as_the_codebook_was_pooled() -> None:
    torch.manual_seed(0)
    teacher = build_model("resnet20", 10).eval()
    student = build_model("resnet8", 10)
    codebook = torch.randn(16, 64)
    d = Quest(student, teacher, codebook, "layer3", "layer2", 32, teacher_pool=2)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    _, losses = d.forward_train(x, y)
    # the same term by hand: teacher layer3 (8x8) pooled 2x2 against student layer2 (16x16)
    # pooled to 4x4 by the loss
    with FeatureTap(teacher, ["layer3"]) as tt, FeatureTap(student, ["layer2"]) as ts:
        teacher(x)
        student(x)
        crit = QuestLoss(codebook, 32)
        crit.predictor.load_state_dict(d.criterion.predictor.state_dict())
        t_map = F.avg_pool2d(tt.outputs["layer3"], 2)
        terms = crit.terms(ts.outputs["layer2"], t_map)
    torch.testing.assert_close(losses["quest"], terms["loss"])


def test_reflect_padding_crops_windows_of_the_reflected_image() -> None:
    from quest.core.data.loader import ArrayDataset, random_crop_flip

    gen = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    batch = img.repeat(16, 1, 1, 1)
    out = random_crop_flip(batch, 2, False, gen, "reflect")
    padded = F.pad(img, (2, 2, 2, 2), mode="reflect")[0]
    windows = {padded[:, i:i + 8, j:j + 8].numpy().tobytes() for i in range(5) for j in range(5)}
    assert all(o.numpy().tobytes() in windows for o in out)
    # reflect never shows the zero border a constant pad shows (the image has no zeros here)
    img2 = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    assert (random_crop_flip(img2, 2, False, torch.Generator().manual_seed(1), "reflect")
            > 0).all()
    assert (random_crop_flip(img2, 2, False, torch.Generator().manual_seed(1)) == 0).any()
    # the per-sample DataLoader path pads the same way
    ds = ArrayDataset(img2.numpy(), np.zeros(16, dtype=np.int64), [0.0] * 3, [1.0] * 3,
                      train=True, padding=2, flip=False, padding_mode="reflect")
    torch.manual_seed(0)
    assert all((ds[i][0] > 0).all() for i in range(16))


def test_bad_padding_mode_and_pool_are_one_line_errors() -> None:
    with pytest.raises(QuestError, match="data.padding_mode"):
        load_config(REPO / "params.yaml", None, ["data.padding_mode=edge"])
    with pytest.raises(QuestError, match="features.pool"):
        load_config(REPO / "params.yaml", None, ["features.pool=0"])


@pytest.mark.slow
def test_cross_size_codebook_is_fit_on_pooled_teacher_vectors(
        tmp_path: Path, smoke_prepared: Path, teacher_checkpoint: Path) -> None:
    from quest.apps.stages.codebook import run_codebook
    from quest.apps.stages.common import load_data
    from quest.apps.stages.features import run_features
    from quest.apps.stages.student import run_student
    from quest.apps.stages.teacher import run_teacher
    from quest.core.checkpoint import load_model_file

    shutil.copytree(smoke_prepared, tmp_path / "data" / "prepared")
    cfg = load_config(REPO / "params.yaml", "smoke", [
        f"teacher.checkpoint={teacher_checkpoint}", "features.pool=2", "student.methods=[quest]",
        "student.arch=resnet8", "student.layer=layer2", "student.train.epochs=1",
        "codebook.k=16", "runtime.threads=1"])
    paths = Paths(tmp_path)
    run_teacher(cfg, paths)
    info = run_features(cfg, paths)
    assert info["map_shape"] == [64, 4, 4] and info["layer_shape"] == [64, 8, 8]
    assert info["pool"] == 2
    # the stored vectors are the teacher's layer3 map pooled 2x2, computed here independently
    feats = np.load(paths.features)
    ds = load_data(paths)
    model, _ = load_model_file(paths.teacher_model, "teacher")
    model.eval()
    mean = torch.tensor(ds.meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(ds.meta["std"]).view(1, -1, 1, 1)
    x = (torch.from_numpy(np.array(ds.train.images[:3])).float() / 255 - mean) / std
    with FeatureTap(model, ["layer3"]) as tap, torch.no_grad():
        model(x)
        ref = F.avg_pool2d(tap.outputs["layer3"], 2).permute(0, 2, 3, 1).reshape(-1, 64)
    assert feats.shape == (len(ds.train.labels) * 16, 64)
    np.testing.assert_allclose(feats[: ref.shape[0]], ref.numpy(), rtol=1e-4, atol=1e-4)
    run_codebook(cfg, paths)
    meta = read_json(paths.codebook_meta)
    assert meta["pool"] == 2 and meta["map_shape"] == [64, 4, 4]
    # training reads the pooling from the codebook: a 16x16 student map against the pooled 4x4
    metrics = run_student(cfg, paths, "quest")
    assert 0.0 <= metrics["top1"] <= 1.0
    # the report's word gallery assigns the same pooled positions
    from quest.apps.report.gallery import build_gallery

    g = build_gallery(model, "layer3", np.load(paths.codebook), np.array(ds.test.images[:4]),
                      ds.meta["mean"], ds.meta["std"], temperature=5.0, words=3, patches=2,
                      patch_scale=1.0, device=torch.device("cpu"), pool=meta["pool"])
    assert g.map_shape == (4, 4) and g.positions == 4 * 16
