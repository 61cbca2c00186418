"""Normalizer: exact round trips (zero-range dimensions included) and refusal of bad statistics."""

import pytest
import torch

from dpolicy.data import DictNormalizer, Normalizer
from dpolicy.errors import CheckpointError, DatasetError


@pytest.mark.parametrize("mode", ["limits", "gaussian"])
def test_round_trip_on_1000_draws_with_zero_range_dims(mode):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(500, 5, generator=g) * torch.tensor([1.0, 100.0, 1e-3, 0.0, 5.0]) + torch.tensor([0, 3, -2, 7.5, 0])
    n = Normalizer.fit(data, mode)
    x = torch.randn(1000, 5, generator=g) * 3
    assert torch.allclose(n.unnormalize(n.normalize(x)), x, atol=1e-5, rtol=1e-5)
    assert torch.all(n.normalize(data)[:, 3] == 0)  # constant dimension -> 0
    if mode == "limits":
        z = n.normalize(data)
        keep = [0, 1, 2, 4]
        assert torch.allclose(z[:, keep].min(0).values, -torch.ones(4), atol=1e-5)
        assert torch.allclose(z[:, keep].max(0).values, torch.ones(4), atol=1e-5)


def test_non_finite_data_is_refused():
    data = torch.zeros(10, 2)
    data[3, 1] = float("nan")
    with pytest.raises(DatasetError, match="'actions' holds NaN"):
        Normalizer.fit(data, name="actions")
    with pytest.raises(DatasetError, match="shape"):
        Normalizer.fit(torch.zeros(0, 2))


def test_dict_normalizer_serializes_and_rejects_missing_statistics():
    n = DictNormalizer.fit({"a": torch.randn(20, 2)}, torch.randn(20, 3))
    m = DictNormalizer.from_dict(n.to_dict())
    x = torch.randn(4, 3)
    assert torch.equal(m.action.normalize(x), n.action.normalize(x))
    with pytest.raises(CheckpointError, match="'obs' and 'action'"):
        DictNormalizer.from_dict({"obs": {}})
    with pytest.raises(CheckpointError, match="obs/a"):
        DictNormalizer.from_dict({"obs": {"a": {"offset": [0.0]}}, "action": n.to_dict()["action"]})
