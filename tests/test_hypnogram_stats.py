"""Hypnogram statistics on hand-made nights, and the simulator's nights against real EESM17 scorings."""

import pathlib

import numpy as np
import pytest

from eegkd_jax.data import hypnogram_stats as hs

W, N1, N2, N3, REM = range(5)
DATA = pathlib.Path(__file__).parent / "data"


def test_summaries_of_a_small_night():
    night = np.array([W, W, N1, N2, N2, N2, -1, N2, N3, N3, REM, W])
    np.testing.assert_array_equal(hs.sleep_period(night), night[2:11])
    assert hs.sleep_period([W, W, -1]).size == 0
    assert hs.bouts(night) == [(W, 2), (N1, 1), (N2, 3), (N2, 1), (N3, 2), (REM, 1), (W, 1)]
    np.testing.assert_allclose(hs.stage_shares([night]), np.array([3, 1, 4, 2, 1]) / 11)
    # minutes: W (2 + 1) / 2 epochs, N2 (3 + 1) / 2 epochs; -1 splits the N2 run
    np.testing.assert_allclose(hs.mean_bout_minutes([night]), [0.75, 0.5, 1.0, 1.0, 0.5])
    t = hs.transition_matrix([night])
    np.testing.assert_allclose(t.sum(axis=1), 1.0)
    # N2 -> N2 twice (pairs across -1 are not counted), N2 -> N3 once
    np.testing.assert_allclose(t[N2], [0, 0, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(t[W], [0.5, 0.5, 0, 0, 0])  # the last W has no successor
    with pytest.raises(ValueError, match="outside"):
        hs.stage_shares([np.array([0, 5])])


def test_distance_is_zero_to_itself_and_grows_with_difference():
    a = [np.array([W, N1, N2, N2, N3, N3, N2, REM, REM, W] * 3)]
    same = hs.distance(a, a)
    assert same["stage_shares_tv"] == 0 and same["transitions_tv"] == 0
    assert same["bout_relative_difference_mean"] == 0
    b = [np.array([W, N1, N2, N2, N2, N2, N2, REM, REM, W] * 3)]  # no N3
    far = hs.distance(b, a)
    assert far["stage_shares_tv"] == pytest.approx(0.2)
    assert far["transitions_tv"] > 0 and far["bout_relative_difference"]["N2"] > 0


@pytest.fixture(scope="module")
def eesm17():
    return hs.read_eesm17(DATA / "eesm17")


def test_simulated_nights_are_as_close_to_eesm17_as_sleep_edf_is(eesm17):
    """The yardstick is the distance between two real datasets (Sleep-EDF cassette vs EESM17,
    measured in benchmarks/results/2026-12-04-hypnogram-distance.json: stage shares TV 0.111,
    transitions TV 0.143, bout lengths 0.567). The simulator's scored nights must be no further
    from EESM17 than that, and each stage's share must lie in the range of EESM17's nights."""
    assert len(eesm17) == 9
    true, scored = hs.simulated(subjects=40, seed=0, hours=7.5)
    d = hs.distance(scored, eesm17)
    assert d["stage_shares_tv"] < 0.111, d
    assert d["transitions_tv"] < 0.143, d
    assert d["bout_relative_difference_mean"] < 0.567, d
    real = np.array([hs.stage_shares([h]) for h in eesm17])
    for shares in (hs.stage_shares(true), hs.stage_shares(scored)):
        assert np.all((shares >= real.min(axis=0)) & (shares <= real.max(axis=0))), shares


SHARED_SLEEP_EDF = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "sleep-edf"


@pytest.mark.skipif(not (SHARED_SLEEP_EDF / "hypnograms").is_dir(),
                    reason="the real Sleep-EDF hypnograms live in ../shared/data")
def test_default_cohort_has_the_dynamics_of_real_nights():
    """The cohort the defaults build (the same function as the benchmark's --cohort) moves from
    stage to stage as real Sleep-EDF nights do: transition distance under 0.08 (half of the real
    nights against the other half: 0.039; time-compressed 2-h nights were at 0.22)."""
    reference = hs.read_sleep_edf(SHARED_SLEEP_EDF / "hypnograms")
    _, scored = hs.config_cohort("online_kd")
    assert len(scored) == 9
    assert hs.distance(scored, reference)["transitions_tv"] < 0.08
    compressed, _ = hs.simulated(subjects=9, seed=0, hours=2.0)
    assert hs.distance(compressed, reference)["transitions_tv"] > 0.08
