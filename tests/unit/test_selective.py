"""Selective decoding policies: Ward change points, the online trigger and its maximum gap,
uniform counts, and errors for bad streams or parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vljepa.decode.selective import Online, OnlineDecider, Uniform, Ward, make_policy, ward_labels


def _piecewise(lengths, dim=16, noise=0.02, seed=0):
    """A stream of len(lengths) constant pieces (random directions) plus small noise, 0.5 s apart."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(len(lengths), dim))
    z = np.concatenate([np.repeat(p[None], n, 0) for p, n in zip(protos, lengths)])
    z += noise * rng.normal(size=z.shape)
    return z, np.arange(len(z)) * 0.5


def test_ward_recovers_the_change_points_of_a_piecewise_constant_stream():
    lengths = [6, 11, 3, 9, 5]
    z, t = _piecewise(lengths)
    plan = Ward(n_segments=len(lengths)).plan(z, t)
    assert plan.boundaries.tolist() == [0, 6, 17, 20, 29, 34]
    assert plan.indices.tolist() == [2, 11, 18, 24, 31]  # the middle row of each segment
    np.testing.assert_allclose(plan.times, t[plan.indices])
    np.testing.assert_allclose(plan.starts, [0.0, 3.0, 8.5, 10.0, 14.5])
    np.testing.assert_allclose(plan.ends, [3.0, 8.5, 10.0, 14.5, 16.5])
    assert plan.labels.tolist() == sum(([k] * n for k, n in enumerate(lengths)), [])


def test_ward_rate_sets_the_number_of_segments_and_threshold_finds_the_pieces():
    z, t = _piecewise([8, 8, 8, 8])  # 32 rows over 16 s
    assert len(Ward(rate=0.25).plan(z, t)) == 4
    assert len(Ward(rate=0.5).plan(z, t)) == 8
    assert len(Ward(rate=100.0).plan(z, t)) == 32  # at most one segment per row
    # Merges inside a piece cost far less than merges across pieces (unit vectors, noise 0.02).
    assert Ward(distance_threshold=1.0).plan(z, t).boundaries.tolist() == [0, 8, 16, 24, 32]


def test_ward_segments_are_runs_even_when_a_piece_comes_back():
    z, t = _piecewise([5, 5, 5])
    z[10:] = z[0]  # the third piece repeats the first: still a separate run
    labels = ward_labels(z / np.linalg.norm(z, axis=1, keepdims=True), n_segments=3)
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5


def test_ward_on_one_row_and_segment_means():
    plan = Ward(n_segments=3).plan(np.ones((1, 4)), [2.0])
    assert plan.indices.tolist() == [0] and plan.boundaries.tolist() == [0, 1]
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, -3.0]])
    plan = Ward(n_segments=2).plan(z, [0.0, 1.0, 2.0, 3.0])
    assert plan.boundaries.tolist() == [0, 2, 4]
    means = plan.segment_means(z)
    torch.testing.assert_close(means, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.0, -1.0]]))


def test_online_fires_at_a_jump_and_not_inside_a_piece():
    z, t = _piecewise([7, 9, 6])
    plan = Online(threshold=0.3).plan(z, t)
    assert plan.indices.tolist() == [0, 7, 16]
    assert plan.boundaries.tolist() == [0, 7, 16, 22]
    np.testing.assert_allclose(plan.starts, plan.times)


def test_online_respects_the_maximum_gap():
    z, t = _piecewise([40])  # 20 s of one scene, no change at all
    assert Online(threshold=0.5).plan(z, t).indices.tolist() == [0]
    plan = Online(threshold=0.5, max_gap_s=3.0).plan(z, t)
    assert plan.indices.tolist() == [0, 6, 12, 18, 24, 30, 36]
    assert np.diff(plan.times).max() <= 3.0


def test_online_decider_live_matches_plan_and_checks_time_order():
    z, t = _piecewise([4, 4])
    decider = OnlineDecider(0.3, max_gap_s=None)
    fired = [decider.update(ti, torch.as_tensor(zi)) for ti, zi in zip(t, z)]
    assert np.flatnonzero(fired).tolist() == Online(threshold=0.3).plan(z, t).indices.tolist() == [0, 4]
    with pytest.raises(ValueError, match="increasing times"):
        decider.update(0.0, z[0])


def test_uniform_count_and_positions():
    z, t = _piecewise([20])  # rows at 0.0 .. 9.5 s
    plan = Uniform(rate=1.0).plan(z, t)
    assert len(plan) == 10 and plan.indices.tolist() == list(range(0, 20, 2))
    assert len(Uniform(rate=0.25).plan(z, t)) == 3  # at 0, 4, 8 s
    assert len(Uniform(rate=10.0).plan(z, t)) == 20  # never more than one per row
    irregular = Uniform(rate=1.0).plan(np.ones((4, 2)), [0.0, 0.3, 1.7, 2.2])
    assert irregular.indices.tolist() == [0, 2, 3]  # first row at or after 0, 1 and 2 s


def test_make_policy_and_parameter_errors():
    assert make_policy("ward", rate=0.5) == Ward(rate=0.5)
    assert make_policy("online", threshold=0.1, max_gap_s=5.0) == Online(threshold=0.1, max_gap_s=5.0)
    assert make_policy("uniform", rate=2.0) == Uniform(rate=2.0)
    with pytest.raises(ValueError, match="unknown decoding policy 'kmeans'"):
        make_policy("kmeans", rate=1.0)
    with pytest.raises(ValueError, match="online policy needs a threshold"):
        make_policy("online")
    with pytest.raises(ValueError, match="exactly one of rate, n_segments or distance_threshold"):
        Ward(rate=1.0, n_segments=3)
    with pytest.raises(ValueError, match=r"Uniform.rate must be a positive number, got 0"):
        Uniform(rate=0)
    with pytest.raises(ValueError, match=r"cosine distance in \[0, 2\]"):
        Online(threshold=3.0)


def test_bad_streams_are_clear_errors():
    with pytest.raises(ValueError, match="stream is empty"):
        Uniform(rate=1.0).plan(np.zeros((0, 4)), [])
    with pytest.raises(ValueError, match=r"times must be \[T\] = \[3\]"):
        Ward(n_segments=2).plan(np.ones((3, 4)), [0.0, 1.0])
    with pytest.raises(ValueError, match=r"times\[1\]=1.0 is followed by 1.0"):
        Online(threshold=0.1).plan(np.ones((3, 4)), [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="embedding row 1 is all zeros"):
        Ward(n_segments=2).plan(np.array([[1.0, 0.0], [0.0, 0.0]]), [0.0, 1.0])
