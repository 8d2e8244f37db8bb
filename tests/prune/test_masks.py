"""prune/masks.py: scores and the masks that keep the best of them (pure tensor functions)."""
from __future__ import annotations

import pytest
import torch

from hetero_llm.errors import InvalidOptionError
from hetero_llm.prune.masks import global_threshold, layer_mask, magnitude_scores, nm_mask, wanda_scores


def scores(rows: int, cols: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Distinct positive scores (continuous random values: no ties)."""
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale + 1e-3


def assert_keeps_largest(s: torch.Tensor, keep: torch.Tensor) -> None:
    assert s[keep].min() > s[~keep].max()


# -- per layer, per row -----------------------------------------------------------------------

@pytest.mark.parametrize("rows, cols, sparsity", [(7, 13, 0.3), (16, 64, 0.5), (5, 11, 0.8), (3, 8, 0.0)])
def test_layer_mask_keeps_the_largest_share_of_the_whole_layer(rows, cols, sparsity):
    s = scores(rows, cols)
    keep = layer_mask(s, sparsity, per_row=False)
    assert keep.dtype == torch.bool and keep.shape == s.shape
    assert int(keep.sum()) == round((1 - sparsity) * s.numel())
    if sparsity > 0:
        assert_keeps_largest(s, keep)
    else:
        assert keep.all()


def test_layer_mask_over_the_layer_is_not_per_row():
    s = scores(4, 10)
    s[0] *= 100  # row 0 holds all the largest scores
    keep = layer_mask(s, 0.5, per_row=False)
    assert keep[0].all() and int(keep.sum()) == 20
    assert int(keep[1:].sum()) == 10


@pytest.mark.parametrize("rows, cols, sparsity", [(7, 13, 0.3), (16, 64, 0.5), (4, 9, 0.75)])
def test_per_row_mask_keeps_the_largest_of_every_row(rows, cols, sparsity):
    s = scores(rows, cols, seed=1)
    s[0] *= 100  # a row of large scores must not take the other rows' share
    keep = layer_mask(s, sparsity, per_row=True)
    per_row = cols - round(sparsity * cols)
    assert keep.sum(dim=1).tolist() == [per_row] * rows
    for r in range(rows):
        assert_keeps_largest(s[r], keep[r])


def test_masks_are_deterministic():
    s = scores(32, 64, seed=3)
    assert torch.equal(layer_mask(s, 0.5, per_row=False), layer_mask(s.clone(), 0.5, per_row=False))
    assert torch.equal(nm_mask(s, 2, 4), nm_mask(s.clone(), 2, 4))


# -- N:M --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2)])
def test_nm_mask_keeps_exactly_n_largest_of_every_m(n, m):
    s = scores(6, 8 * m, seed=n + m)
    keep = nm_mask(s, n, m)
    assert keep.shape == s.shape and keep.dtype == torch.bool
    groups, kept = s.reshape(6, 8, m), keep.reshape(6, 8, m)
    assert (kept.sum(dim=2) == n).all()
    for r in range(6):
        for g in range(8):
            assert_keeps_largest(groups[r, g], kept[r, g])


def test_nm_groups_are_consecutive_inputs_of_a_row():
    s = torch.tensor([[1.0, 9.0, 8.0, 2.0, 5.0, 6.0, 7.0, 4.0]])
    assert nm_mask(s, 2, 4).tolist() == [[False, True, True, False, False, True, True, False]]


@pytest.mark.parametrize("cols, m", [(10, 4), (12, 8), (7, 2)])
def test_nm_mask_refuses_inputs_not_a_multiple_of_m(cols, m):
    with pytest.raises(InvalidOptionError, match=f"multiple of {m}") as info:
        nm_mask(scores(3, cols), 1, m)
    assert "unstructured" in str(info.value)


# -- global -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_global_threshold_reaches_the_total_sparsity_over_layers_of_different_scale(sparsity):
    layers = [scores(64, 96, seed=1, scale=0.01), scores(32, 64, seed=2, scale=1.0),
              scores(128, 64, seed=3, scale=50.0), scores(16, 200, seed=4, scale=3.0)]
    total = sum(s.numel() for s in layers)
    fns = [lambda s=s: s for s in layers]
    t = global_threshold(fns, total, sparsity)
    pruned = sum(int((s < t).sum()) for s in layers)
    assert abs(pruned / total - sparsity) < 0.005
    # one threshold for all: the layers do not each reach the sparsity
    shares = [float((s < t).float().mean()) for s in layers]
    assert max(shares) - min(shares) > 0.3
    assert shares[0] >= shares[1] >= shares[2]  # smaller scale, more pruned


def test_global_threshold_asks_each_layer_for_its_scores_lazily():
    calls = []
    layers = [scores(8, 8, seed=i, scale=i + 1) for i in range(3)]

    def fn(i):
        calls.append(i)
        return layers[i]

    global_threshold([lambda i=i: fn(i) for i in range(3)], 192, 0.5)
    assert set(calls) == {0, 1, 2}


# -- scores -----------------------------------------------------------------------------------

def test_wanda_scores_are_weight_magnitude_times_input_norm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g)
    x = torch.randn(40, 7, generator=g) * torch.arange(1, 8)  # inputs of different sizes per channel
    ss = (x ** 2).sum(dim=0)
    got = wanda_scores(w, ss)
    want = torch.stack([w[i].abs() * x.norm(dim=0) for i in range(5)])
    assert got.dtype == torch.float32 and got.shape == w.shape
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, w.abs() * ss.sqrt())


def test_wanda_scores_accept_low_precision_weights_and_stats():
    w = torch.randn(4, 8).to(torch.bfloat16)
    ss = torch.rand(8, dtype=torch.float64) * 10
    got = wanda_scores(w, ss)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, w.float().abs() * ss.float().sqrt())


def test_wanda_ranking_differs_from_magnitude_when_activations_differ():
    w = torch.ones(1, 4)
    w[0, 0] = 2.0  # the largest weight meets the smallest activation
    ss = torch.tensor([0.01, 4.0, 4.0, 4.0])
    assert layer_mask(magnitude_scores(w), 0.25, per_row=True)[0, 0]
    assert not layer_mask(wanda_scores(w, ss), 0.25, per_row=True)[0, 0]


def test_magnitude_scores_are_absolute_fp32_and_detached():
    w = torch.tensor([[-3.0, 1.0], [0.5, -0.25]], requires_grad=True)
    s = magnitude_scores(w)
    assert s.dtype == torch.float32 and not s.requires_grad
    assert s.tolist() == [[3.0, 1.0], [0.5, 0.25]]
