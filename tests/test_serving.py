"""The registered model's inputs and answers, in process (the server test is in test_mlflow.py):
encoded images of any size and mode are decoded by the model's own preprocessing, uint8 tensors
stay, class names come with probabilities, and every malformed input is refused naming the
expected one (float pixels in [0, 1] were silently rounded before)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from quest.apps.tracking.pyfunc_model import EXPECTED, MODEL_FILE_ARTIFACT, QuestImageClassifier
from quest.apps.tracking.server import answer, encode_images
from quest.core.checkpoint import save_model_file
from quest.core.models.zoo import build_model

CLASSES = [f"class-{i}" for i in range(10)]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> QuestImageClassifier:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pyfunc") / "student.pt"
    save_model_file(path, build_model("resnet8", 10), arch="resnet8", num_classes=10,
                    classes=CLASSES, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    m = QuestImageClassifier()
    m.load_context(SimpleNamespace(artifacts={MODEL_FILE_ARTIFACT: str(path)},
                                   model_config={"image_size": [32, 32], "crop_ratio": 1.0}))
    return m


def _b64(img: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_encoded_images_of_any_size_and_mode(model: QuestImageClassifier) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    # PNG is lossless and 32 x 32 needs no resize: the same probabilities as the tensor input
    np.testing.assert_allclose(model.predict_encoded(encode_images(pixels)),
                               model.predict(None, pixels), atol=1e-6)
    big = Image.fromarray(rng.integers(0, 256, (1600, 900, 3), dtype=np.uint8))
    odd = [_b64(big.convert("CMYK"), "JPEG"), _b64(big.convert("RGBA"), "PNG"),
           _b64(Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)), "PNG"),
           _b64(big.resize((8, 12)).convert("P"), "GIF"), _b64(big.convert("L"), "JPEG")]
    assert model.decode(odd).shape == (5, 32, 32, 3)
    probs = model.predict_encoded(odd)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    top = model.top_k(probs, 3)
    assert [len(t) for t in top] == [3] * 5
    for row, t in zip(probs, top, strict=True):
        assert t[0]["class"] == CLASSES[int(row.argmax())]
        assert t[0]["probability"] == pytest.approx(float(row.max()))


@pytest.mark.parametrize("bad,names", [
    (np.full((1, 32, 32, 3), 0.5), "scale float pixels by 255"),  # floats in [0, 1]
    (np.zeros((1, 32, 32, 1), np.uint8), "3 channels"),
    (np.zeros((1, 32, 32, 4), np.uint8), "3 channels"),
    (np.zeros((1, 40, 32, 3), np.uint8), "must be 32 x 32"),
    (np.full((1, 32, 32, 3), 300), "values from"),
    (np.zeros((32,), np.uint8), "got shape"),
])
def test_malformed_tensors_are_refused_naming_the_input(model: QuestImageClassifier,
                                                        bad: np.ndarray, names: str) -> None:
    with pytest.raises(ValueError) as err:
        model.predict(None, bad)
    assert str(err.value).startswith(EXPECTED) and names in str(err.value)


def test_integer_valued_json_pixels_are_accepted(model: QuestImageClassifier) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(model.predict(None, pixels.astype(np.int64)),
                               model.predict(None, pixels), atol=0)
    np.testing.assert_allclose(model.predict(None, pixels.astype(np.float64)),
                               model.predict(None, pixels), atol=0)


@pytest.mark.parametrize("body,names", [
    ({"images": ["@@ not base64 @@"]}, "not valid base64"),
    ({"images": [base64.b64encode(b"plain text, not a JPEG").decode()]}, "does not decode"),
    ({"images": [base64.b64encode(b"").decode()]}, "does not decode"),
    ({"images": []}, "got no images"),
    ({"images": [3]}, "is a int"),
    ({"pixels": [1]}, '"images"'),
    ({"images": ["x"], "inputs": [1]}, '"images"'),
    ({"inputs": [[1, 2], [3]]}, "expected"),
])
def test_malformed_bodies_are_refused_naming_the_input(model: QuestImageClassifier,
                                                       body: dict, names: str) -> None:
    with pytest.raises(ValueError) as err:
        answer(model, body)
    assert "expected" in str(err.value) and names in str(err.value)


def test_truncated_jpeg_is_refused(model: QuestImageClassifier, tmp_path: Path) -> None:
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    truncated = base64.b64encode(buf.getvalue()[: len(buf.getvalue()) // 2]).decode()
    with pytest.raises(ValueError, match="image 0 does not decode"):
        model.predict_encoded([truncated])
