"""The no-network reference detector: scaling on the training rows, signed EWMA, threshold,
hysteresis."""

from __future__ import annotations

import numpy as np
import pytest

from anomalyd_train.reference import ReferenceConfig, reference_detector


def test_a_lasting_shift_is_flagged_and_noise_is_not() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 3))
    x[600:700, 1] += 3.0  # a level shift on one channel, 3 training sigmas, 100 rows
    result = reference_detector(x, 400, ReferenceConfig())
    assert result.alert[620:700].all()  # accumulated within a few rows, held while it lasts
    assert not result.alert[400:600].any()  # unseen normal rows: no alarm
    assert result.alert[700:720].all()  # hysteresis: off only after k_exit rows below
    assert not result.alert[760:].any()


def test_threshold_is_factor_times_the_training_quantile() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 2))
    cfg = ReferenceConfig(factor=2.0, quantile=0.9)
    result = reference_detector(x, 400, cfg)
    assert result.threshold == pytest.approx(2.0 * np.quantile(result.score[:400], 0.9))


def test_signed_averaging_cancels_symmetric_noise_but_not_a_bias() -> None:
    x = np.zeros((800, 1))
    x[:400, 0] = np.tile([1.0, -1.0], 200)  # training: std 1
    x[400:600, 0] = np.tile([3.0, -3.0], 100)  # louder noise, no bias: averages out
    x[600:, 0] = 1.0  # a bias of one sigma
    result = reference_detector(x, 400, ReferenceConfig(alpha=0.1))
    assert result.score[450:600].max() < result.score[700:].min()


def test_constant_training_channel_and_bad_shapes() -> None:
    x = np.ones((500, 2))
    x[450:, 0] = 2.0
    result = reference_detector(x, 400, ReferenceConfig())
    assert np.isfinite(result.score).all()
    assert result.alert[460:].all()
    with pytest.raises(ValueError, match="more than 400 rows"):
        reference_detector(np.ones((400, 2)), 400, ReferenceConfig())
    with pytest.raises(ValueError, match="2-D"):
        reference_detector(np.ones(500), 400, ReferenceConfig())
