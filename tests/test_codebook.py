"""Tests for the codebook maths: both k-means backends, assignment and usage statistics."""

from __future__ import annotations

import numpy as np
import pytest

import quest.core.codebook as cb
from quest.infra.errors import QuestError


def _mixture(n: int = 4000, dim: int = 16, centres: int = 24, seed: int = 0) -> np.ndarray:
    """Seeded Gaussian mixture with well separated centres."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 4.0, size=(centres, dim))
    which = rng.integers(0, centres, size=n)
    return (means[which] + rng.normal(0.0, 1.0, size=(n, dim))).astype(np.float32)


def _brute_force_sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """All squared distances in float64, the slow obvious way."""
    diff = x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None, :, :]
    return (diff * diff).sum(axis=-1)


@pytest.fixture(scope="module")
def mixture() -> np.ndarray:
    """The shared small problem: 4000 x 16."""
    return _mixture()


def test_faiss_and_torch_agree(mixture: np.ndarray) -> None:
    res_f = cb.fit_kmeans(mixture, 32, iterations=10, seed=3, backend="faiss")
    res_t = cb.fit_kmeans(mixture, 32, iterations=10, seed=3, backend="torch")
    assert res_f.backend == "faiss" and res_t.backend == "torch"
    assert len(res_f.objective) == len(res_t.objective) == 10
    # Same data and same initial centroids: the first assignment step is the same computation.
    assert res_t.objective[0] == pytest.approx(res_f.objective[0], rel=1e-5)
    assert res_t.objective[-1] == pytest.approx(res_f.objective[-1], rel=0.01)
    assert res_f.centroids.shape == res_t.centroids.shape == (32, 16)
    assert res_f.centroids.dtype == res_t.centroids.dtype == np.float32
    # The reported objective is the total squared distance at that step's assignment; it must
    # match what the centroids of the previous step give when recomputed from scratch.
    res_t9 = cb.fit_kmeans(mixture, 32, iterations=9, seed=3, backend="torch")
    recomputed = cb.codebook_stats(mixture, res_t9.centroids)["objective_total"]
    assert res_t.objective[-1] == pytest.approx(recomputed, rel=1e-5)


def test_torch_objective_non_increasing(mixture: np.ndarray) -> None:
    res = cb.fit_kmeans(mixture, 32, iterations=15, seed=1, backend="torch")
    obj = np.asarray(res.objective)
    assert res.reseeded == 0
    assert np.all(np.diff(obj) <= 1e-6 * obj[:-1])
    assert obj[-1] < obj[0]
    # Final centroids are at least as good as the last reported assignment step.
    final = cb.codebook_stats(mixture, res.centroids)["objective_total"]
    assert final <= obj[-1] * (1 + 1e-6)


def test_auto_picks_faiss_and_falls_back(
    mixture: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cb.faiss_available()
    assert cb.fit_kmeans(mixture, 4, iterations=1).backend == "faiss"
    monkeypatch.setattr(cb, "faiss_available", lambda: False)
    assert cb.fit_kmeans(mixture, 4, iterations=1).backend == "torch"
    with pytest.raises(QuestError, match="pip install faiss-cpu, or set codebook.backend: torch"):
        cb.fit_kmeans(mixture, 4, backend="faiss")


def test_input_errors(mixture: np.ndarray) -> None:
    with pytest.raises(QuestError) as info:
        cb.fit_kmeans(mixture[:1000], 4096, backend="torch")
    assert str(info.value) == (
        "codebook size K=4096 is larger than the 1000 feature vectors: lower codebook.k "
        "or extract more features (features.max_vectors)"
    )
    bad = mixture.copy()
    bad[17, 3] = np.nan
    with pytest.raises(QuestError, match="NaN/Inf"):
        cb.fit_kmeans(bad, 8, backend="torch")
    bad[17, 3] = np.inf
    with pytest.raises(QuestError, match="NaN/Inf"):
        cb.fit_kmeans(bad, 8, backend="faiss")
    with pytest.raises(QuestError, match="2-D"):
        cb.fit_kmeans(mixture.reshape(4000, 4, 4), 8)
    with pytest.raises(QuestError, match="at least 2"):
        cb.fit_kmeans(mixture, 1)
    with pytest.raises(QuestError, match="unknown k-means backend 'sklearn'") as info:
        cb.fit_kmeans(mixture, 8, backend="sklearn")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_subsampling_respected(mixture: np.ndarray, backend: str) -> None:
    k, mppc = 8, 10
    res = cb.fit_kmeans(
        mixture, k, iterations=5, seed=7, backend=backend, max_points_per_centroid=mppc
    )
    assert res.n_train == k * mppc
    x_sub, init = cb.sample_training_set(mixture, k, seed=7, max_points_per_centroid=mppc)
    assert x_sub.shape == (k * mppc, 16)
    # Every sampled row is a distinct row of the input.
    rows = {r.tobytes() for r in x_sub}
    assert len(rows) == k * mppc and rows <= {r.tobytes() for r in mixture}
    assert all(r.tobytes() in rows for r in init)
    # Fitting the explicit subsample gives the very same codebook: nothing else was used.
    direct = cb.fit_kmeans(x_sub, k, iterations=5, seed=7, backend=backend)
    assert direct.n_train == k * mppc
    np.testing.assert_allclose(res.centroids, direct.centroids, rtol=1e-6, atol=1e-6)
    assert res.objective == pytest.approx(direct.objective, rel=1e-6)
    # The objective is a total over the 80 training points, not over all 4000.
    assert res.objective[0] == pytest.approx(
        _brute_force_sq_dists(x_sub, init).min(axis=1).sum(), rel=1e-5
    )


def test_same_draw_for_both_backends(mixture: np.ndarray) -> None:
    x_sub, init = cb.sample_training_set(mixture, 16, seed=2, max_points_per_centroid=20)
    x_sub2, init2 = cb.sample_training_set(mixture, 16, seed=2, max_points_per_centroid=20)
    np.testing.assert_array_equal(x_sub, x_sub2)
    np.testing.assert_array_equal(init, init2)
    other, _ = cb.sample_training_set(mixture, 16, seed=3, max_points_per_centroid=20)
    assert not np.array_equal(x_sub, other)
    # No subsampling when there are few enough points.
    full, _ = cb.sample_training_set(mixture, 16, seed=2, max_points_per_centroid=1000)
    np.testing.assert_array_equal(full, mixture)


def _duplicated_data() -> np.ndarray:
    """300 distinct points plus 700 copies of one point, so initial centroids repeat."""
    rng = np.random.default_rng(11)
    distinct = rng.normal(size=(300, 8)).astype(np.float32)
    dup = np.tile(rng.normal(size=(1, 8)).astype(np.float32) + 1.0, (700, 1))
    return np.concatenate([distinct, dup])


def test_empty_cluster_reseed_counted() -> None:
    x = _duplicated_data()
    k = 16
    x_train, init = cb.sample_training_set(x, k, seed=0)
    # Identical initial centroids tie; all their points go to the first one, the rest empty.
    expected = k - len(np.unique(cb.assign(x_train, init)))
    assert expected >= 3
    one = cb.fit_kmeans(x, k, iterations=1, seed=0, backend="torch")
    assert one.reseeded == expected
    assert np.isfinite(one.centroids).all()
    # Each re-seeded centroid is a slightly perturbed copy of another centroid (a split).
    d = np.sqrt(_brute_force_sq_dists(one.centroids, one.centroids))
    np.fill_diagonal(d, np.inf)
    scale = np.linalg.norm(one.centroids, axis=1)
    split_like = d.min(axis=1) <= 2.5 * (1 / 1024) * scale
    assert split_like.sum() >= expected
    # FAISS sees the same assignment at its first step, so it re-seeds the same number.
    faiss_one = cb.fit_kmeans(x, k, iterations=1, seed=0, backend="faiss")
    assert faiss_one.reseeded == expected

    many = cb.fit_kmeans(x, k, iterations=10, seed=0, backend="torch")
    assert many.reseeded >= expected
    assert np.isfinite(many.centroids).all()
    # The splits let the codebook spread over the distinct points: few words stay unused.
    stats = cb.codebook_stats(x, many.centroids)
    assert stats["dead_words"] < expected


def test_codebook_stats_perplexity() -> None:
    rng = np.random.default_rng(5)
    k = 8
    centroids = rng.normal(0.0, 10.0, size=(k, 4)).astype(np.float32)
    uniform = np.repeat(centroids, 5, axis=0)
    stats = cb.codebook_stats(uniform, centroids)
    assert stats["perplexity"] == pytest.approx(k, rel=1e-9)
    assert stats["usage"] == [5] * k
    assert stats["dead_words"] == 0
    assert stats["usage_max"] == stats["usage_min"] == 5
    assert stats["objective_total"] == pytest.approx(0.0, abs=1e-3)
    assert stats["n"] == 40 and stats["k"] == k

    one = np.repeat(centroids[2:3], 30, axis=0)
    stats = cb.codebook_stats(one, centroids)
    assert stats["perplexity"] == pytest.approx(1.0)
    assert stats["dead_words"] == k - 1
    assert stats["usage"][2] == 30 and stats["usage_min"] == 0 and stats["usage_max"] == 30

    skewed = np.concatenate([np.repeat(centroids[:1], 3, axis=0), centroids[1:2]]) + 1.0
    stats = cb.codebook_stats(skewed, centroids)
    p = np.bincount(cb.assign(skewed, centroids), minlength=k) / 4
    p = p[p > 0]
    assert stats["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    ref = _brute_force_sq_dists(skewed, centroids).min(axis=1)
    assert stats["objective_total"] == pytest.approx(ref.sum(), rel=1e-5)
    assert stats["objective_mean"] == pytest.approx(ref.mean(), rel=1e-5)


def test_assign_matches_brute_force() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(1000, 16)).astype(np.float32)
    c = rng.normal(size=(37, 16)).astype(np.float32)
    ref_d = _brute_force_sq_dists(x, c)
    ref = ref_d.argmin(axis=1)
    for chunk in (1, 100, 65536):
        labels = cb.assign(x, c, chunk=chunk)
        assert labels.dtype == np.int64 and labels.shape == (1000,)
        np.testing.assert_array_equal(labels, ref)
    with pytest.raises(QuestError, match="channels"):
        cb.assign(x, c[:, :8])


def test_k_equal_n_copies_points() -> None:
    x = _mixture(n=40, dim=4)
    for backend in ("torch", "faiss"):
        res = cb.fit_kmeans(x, 40, backend=backend)
        np.testing.assert_array_equal(res.centroids, x)
        assert res.objective == [0.0]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_fit_is_byte_identical_for_a_given_thread_count(backend: str) -> None:
    """Two fits of the same input, seed and thread count give the same bytes (sha256), on both
    backends; the FAISS thread count given to a fit is restored after it."""
    import hashlib

    import faiss
    import torch

    x = _mixture(n=6000, dim=32, centres=40, seed=3)
    torch_before = torch.get_num_threads()
    shas = set()
    try:
        for threads in (2, 2, 1, 1):
            torch.set_num_threads(threads)
            res = cb.fit_kmeans(x, 64, iterations=8, seed=5, backend=backend, threads=threads)
            shas.add((threads, hashlib.sha256(res.centroids.tobytes()).hexdigest()))
        torch.set_num_threads(2)
        cb.fit_kmeans(x, 64, iterations=1, seed=5, backend=backend, threads=1)
        assert faiss.omp_get_max_threads() == 2  # the fit's own count did not leak out
    finally:
        torch.set_num_threads(torch_before)
    # one hash per thread count: repeated fits never differ
    assert sorted(t for t, _ in shas) == [1, 2]
