"""Calibration: ECE and its reliability bins against the formula, temperature scaling fitted on val only."""

import json
import math

import pytest
import torch

from fetalssl.finetune.calibration import (
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
    scaled,
)


def overconfident(n=400, classes=4, seed=0, sharpness=4.0):
    """Labels drawn from softmax(z), predicted with softmax(sharpness * z): right on average, overconfident."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g)
    targets = torch.multinomial(torch.softmax(z, dim=1), 1, generator=g).squeeze(1)
    return torch.softmax(sharpness * z, dim=1), targets


def test_ece_is_the_count_weighted_gap_between_accuracy_and_confidence_per_bin():
    probs, targets = overconfident()
    bins = reliability_bins(probs, targets, n_bins=10)
    assert sum(b["count"] for b in bins) == len(targets)
    by_hand = sum(b["count"] / len(targets) * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert expected_calibration_error(probs, targets, 10) == pytest.approx(by_hand, abs=1e-12)
    # torchmetrics' ECE is the same where no confidence is exactly 1 (it gives those a bin of their own)
    from torchmetrics.functional.classification import multiclass_calibration_error

    assert probs.max() < 1
    assert expected_calibration_error(probs, targets, 10) == pytest.approx(
        float(multiclass_calibration_error(probs, targets, num_classes=4, n_bins=10, norm="l1")), abs=1e-6)
    confidence = probs.max(dim=1).values
    for b in bins:  # each image sits in the bin of its confidence
        inside = (confidence >= b["lower"]) & (confidence < b["upper"])
        assert int(inside.sum()) == b["count"]
    one_hot = torch.nn.functional.one_hot(targets, 4).float()
    assert expected_calibration_error(one_hot, targets, 10) == pytest.approx(0.0, abs=1e-7)  # sure and right


def test_temperature_fitted_on_overconfident_probabilities_undoes_the_sharpening():
    probs, targets = overconfident(n=4000, sharpness=3.0)
    temperature = fit_temperature(probs, targets)
    assert temperature == pytest.approx(3.0, rel=0.1)  # the labels follow softmax(z): T = the sharpening
    after = scaled(probs, temperature)
    assert torch.equal(after.argmax(1), probs.argmax(1))  # predictions are unchanged
    assert expected_calibration_error(after, targets, 15) < 0.5 * expected_calibration_error(probs, targets, 15)


def test_report_fits_the_temperature_on_val_and_measures_test():
    val, test = overconfident(seed=1, sharpness=3.0), overconfident(seed=2, sharpness=3.0)
    report = calibration_report(val, test, n_bins=15, temperature_scaling=True)
    assert report["temperature"] == pytest.approx(fit_temperature(*val))
    assert report["temperature"] != pytest.approx(fit_temperature(*test), rel=1e-4)  # not refitted on test
    assert report["ece"] == pytest.approx(expected_calibration_error(*test, 15))
    assert report["ece_scaled"] == pytest.approx(expected_calibration_error(scaled(test[0], report["temperature"]),
                                                                            test[1], 15))
    json.dumps(report)  # goes into metrics.json as is
    plain = calibration_report(val, test, n_bins=15, temperature_scaling=False)
    assert "temperature" not in plain and plain["ece"] == report["ece"] and not math.isnan(plain["ece"])
