"""The comparison helpers catch a single perturbed element, and the reference is right by hand."""

from __future__ import annotations

import pytest
import torch

from pma_dist.testing import assert_bitwise_equal, assert_close_rel, merge_reference


def _pair():
    torch.manual_seed(0)
    expected = {"a": torch.randn(4, 5), "b": torch.randn(7)}
    return {k: v.clone() for k, v in expected.items()}, expected


def test_close_rel_catches_one_element() -> None:
    actual, expected = _pair()
    assert_close_rel(actual, expected, 1e-6)
    actual["b"][3] += 2e-6 * expected["b"].abs().max()
    with pytest.raises(AssertionError, match="'b'"):
        assert_close_rel(actual, expected, 1e-6)


def test_bitwise_catches_one_ulp_and_nan_payloads() -> None:
    actual, expected = _pair()
    assert_bitwise_equal(actual, expected)
    actual["a"][2, 2] = torch.nextafter(expected["a"][2, 2], torch.tensor(float("inf")))
    with pytest.raises(AssertionError, match="a differs in 1"):
        assert_bitwise_equal(actual, expected)
    nan_a = torch.tensor([float("nan")])
    nan_b = (nan_a.view(torch.int32) ^ 1).view(torch.float32)
    with pytest.raises(AssertionError):
        assert_bitwise_equal({"x": nan_a}, {"x": nan_b})


def test_reference_by_hand() -> None:
    snaps = [{"x": torch.tensor([1.0])}, {"x": torch.tensor([3.0])}]
    assert merge_reference(snaps, "sma")["x"].item() == 2.0
    assert merge_reference(snaps, "wma")["x"].item() == pytest.approx(7 / 3)
    assert merge_reference(snaps, "ema", alpha=0.25)["x"].item() == pytest.approx(
        0.25 * 3 + 0.75 * 1
    )
    assert merge_reference(snaps, "sma", weights=[1.0, 3.0])["x"].item() == pytest.approx(2.5)
