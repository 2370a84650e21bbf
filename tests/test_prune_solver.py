"""OBS solver, Wanda/magnitude masks, N:M patterns, Conv2d path and structured column removal."""

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_accel.calib import conv2d_rows
from diffusion_accel.prune import magnitude_mask, nm_mask, obs_prune, wanda_mask
from diffusion_accel.prune.columns import ColumnPruner


def correlated_inputs(rows: int = 512, width: int = 64, seed: int = 0) -> torch.Tensor:
    """Inputs (rows, width) with strongly correlated features and uneven scales."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=gen) * 0.3 + torch.eye(width)
    scales = torch.logspace(-1, 1, width)
    return (torch.randn(rows, width, generator=gen) @ mixing) * scales


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def output_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight - pruned) @ x.T).norm())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_obs_beats_magnitude_and_wanda(nm):
    x = correlated_inputs()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    obs_weight, obs_mask = obs_prune(weight, hessian_of(x), 0.5, nm=nm)
    wanda = weight.masked_fill(wanda_mask(weight, x.pow(2).sum(0), 0.5, nm), 0)
    magnitude = weight.masked_fill(magnitude_mask(weight, 0.5, nm), 0)
    obs_error = output_error(weight, obs_weight, x)
    assert torch.equal(obs_weight == 0, obs_mask)
    assert obs_error < output_error(weight, wanda, x)
    assert obs_error < output_error(weight, magnitude, x)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4)])
def test_column_blocks_only_batch_the_updates(nm):
    """SparseGPT's lazy batching is exact: with a per-group N:M mask, 16-column blocks (each block's error carried
    into all later columns at once) give one 64-column block's weights. A dropped cross-block update passed
    every other test (session 32 mutation audit)."""
    x = correlated_inputs()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    whole, whole_mask = obs_prune(weight, hessian_of(x), 1 - nm[0] / nm[1], nm=nm, blocksize=64)
    blocked, blocked_mask = obs_prune(weight, hessian_of(x), 1 - nm[0] / nm[1], nm=nm, blocksize=16)
    assert torch.equal(whole_mask, blocked_mask)
    torch.testing.assert_close(blocked, whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("second", [(0.5, (2, 4)), (0.5, (4, 8)), (0.7, None), (0.3, None)])
def test_a_second_obs_prune_keeps_the_first_ones_zeros(second):
    """Pruning a pruned weight again (unstructured 50% then 2:4, 4:8 or more / less unstructured): the earlier
    zeros took the compensation of the columns before them and 17% came back under 2:4 (session 53 review)."""
    sparsity, nm = second
    x = correlated_inputs()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    first, first_mask = obs_prune(weight, hessian_of(x), 0.5, blocksize=16)
    again, mask = obs_prune(first, hessian_of(x), sparsity, nm=nm, blocksize=16)
    assert torch.equal(again == 0, mask) and bool(mask[first_mask].all())
    if nm is not None:  # still an N:M pattern: at most N nonzero weights in every group of M
        assert int((again != 0).reshape(48, -1, nm[1]).sum(-1).max()) <= nm[0]
    else:
        assert int(mask.sum()) == round(weight.numel() * max(sparsity, 0.5))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_counts_are_exact(sparsity):
    weight = torch.randn(30, 70)
    expected = round(weight.numel() * sparsity)
    _, mask = obs_prune(weight, hessian_of(correlated_inputs(width=70)), sparsity, blocksize=16)
    assert int(mask.sum()) == expected
    assert int(magnitude_mask(weight, sparsity).sum()) == expected
    per_row = wanda_mask(weight, torch.rand(70) + 0.1, sparsity).sum(1)
    assert torch.all(per_row == round(70 * sparsity))


def test_wanda_keeps_one_weight_per_row_however_high_the_sparsity():
    """round(7 * 0.98) = 7: every row of a 7-wide layer was cleared, the layer left with its bias only."""
    assert torch.all(wanda_mask(torch.randn(5, 7), torch.rand(7) + 0.1, 0.98).sum(1) == 6)


@pytest.mark.parametrize("keep,group", [(2, 4), (4, 8), (1, 4)])
def test_nm_patterns_are_exact(keep, group):
    weight = torch.randn(16, 64)
    obs_weight, _ = obs_prune(weight, hessian_of(correlated_inputs()), 1 - keep / group, nm=(keep, group))
    for pruned in (obs_weight, weight.masked_fill(nm_mask(weight.abs(), keep, group), 0),
                   weight.masked_fill(wanda_mask(weight, torch.rand(64), 0.0, (keep, group)), 0)):
        nonzero = (pruned != 0).reshape(16, 64 // group, group).sum(2)
        assert torch.all(nonzero == keep)


def test_nm_rejects_width_not_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of M=4"):
        nm_mask(torch.rand(3, 6), 2, 4)


def test_dead_inputs_are_kept_and_the_count_is_exact():
    """Zeroing dead inputs (no calibration signal) pruned beyond the target, even at sparsity 0: a 3x3
    conv calibrated on a 1x1 feature map sees only padding off-centre, yet not at the generation size."""
    x = correlated_inputs(width=32)
    x[:, 5] = 0
    weight = torch.randn(8, 32)
    untouched, mask = obs_prune(weight, hessian_of(x), 0.0)
    assert torch.equal(untouched, weight) and not mask.any()
    new_weight, mask = obs_prune(weight, hessian_of(x), 0.25)
    assert int(mask.sum()) == 64 and int((new_weight == 0).sum()) == 64 and torch.isfinite(new_weight).all()


def test_conv2d_path_matches_linear_on_unfolded_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1, stride=2)
    images = torch.randn(4, 3, 9, 9)
    rows = conv2d_rows(conv, images)
    linear = nn.Linear(27, 5)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.reshape(5, -1))
        linear.bias.copy_(conv.bias)
    conv_out = conv(images).permute(0, 2, 3, 1).reshape(-1, 5)
    assert torch.allclose(linear(rows), conv_out, atol=1e-5)
    conv_pruned, _ = obs_prune(conv.weight.reshape(5, -1), hessian_of(rows), 0.5, blocksize=8)
    linear_pruned, _ = obs_prune(linear.weight, hessian_of(rows), 0.5, blocksize=8)
    assert torch.equal(conv_pruned, linear_pruned)


def test_column_removal_is_least_squares_optimal():
    x = correlated_inputs(width=24)
    weight = torch.randn(6, 24)
    pruner = ColumnPruner(weight, hessian_of(x), damp=1e-8)
    removed = torch.tensor([1, 5, 6, 20])
    pruner.remove(removed)
    keep = torch.ones(24, dtype=torch.bool)
    keep[removed] = False
    best = torch.linalg.lstsq(x[:, keep], x @ weight.T).solution.T
    target = x @ weight.T
    optimal = float((x[:, keep] @ best.T - target).norm())
    assert float((x[:, keep] @ pruner.weight.T - target).norm()) <= 1.001 * optimal
    assert pruner.hessian.shape == (20, 20)


def test_global_allocation_hits_the_target_and_favours_concentrated_layers():
    from diffusion_accel.prune.allocate import SaliencyProfile, allocate_sparsity, normalized_saliency
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(64, 64, generator=generator)  # importance spread evenly
    spiky = torch.randn(64, 64, generator=generator) * (torch.rand(64, 64, generator=generator) < 0.1)
    spiky = spiky + 1e-3 * torch.randn(64, 64, generator=generator)  # few weights carry the layer
    profiles = {"flat": SaliencyProfile(normalized_saliency(flat, None)),
                "spiky": SaliencyProfile(normalized_saliency(spiky, torch.ones(64)))}
    shares = allocate_sparsity(profiles, 0.5)
    assert abs((shares["flat"] + shares["spiky"]) / 2 - 0.5) < 1e-3
    assert shares["spiky"] > 0.8 > 0.2 > shares["flat"]
    assert allocate_sparsity({}, 0.5) == {}


def test_error_allocation_spends_the_budget_where_error_is_cheapest():
    from diffusion_accel.prune.allocate import allocate_by_error, error_grid
    grid = error_grid(0.5)
    assert grid[0] == 0.0 and grid[-1] == 0.95 and all(b > a for a, b in zip(grid, grid[1:]))
    assert error_grid(0.97)[-1] == 0.97
    curves = {"robust": [0.01 * s ** 2 for s in grid], "fragile": [1.0 * s ** 2 for s in grid],
              "bumpy": [0.1 * s ** 2 + (0.05 if 0.2 < s < 0.3 else 0.0) for s in grid]}  # not convex
    sizes = {"robust": 1000, "fragile": 1000, "bumpy": 2000}
    shares = allocate_by_error(curves, sizes, 0.5, grid)
    assert abs(sum(shares[n] * sizes[n] for n in sizes) / sum(sizes.values()) - 0.5) < 1e-9
    assert shares["robust"] > shares["bumpy"] > shares["fragile"] and max(shares.values()) <= 0.95
    uniform_error = sum(curve[grid.index(0.5)] for curve in curves.values())
    def error_at(name, share):  # linear interpolation on the grid
        return float(np.interp(share, grid, curves[name]))
    assert sum(error_at(n, s) for n, s in shares.items()) < uniform_error


def test_global_allocation_meets_the_target_when_saliencies_tie():
    """One threshold cannot split a tie: an all-equal layer kept every weight at a 50% target, and a layer
    of int4-rounded weights (few distinct magnitudes) took 67%."""
    from diffusion_accel.prune.allocate import SaliencyProfile, allocate_sparsity, normalized_saliency
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 256, generator=generator)
    step = weight.abs().max() / 7
    int4_rounded = torch.clamp(torch.round(weight / step), -8, 7) * step
    for layers in ({"equal": torch.ones(64, 64)}, {"zero": torch.zeros(8, 8)}, {"int4": int4_rounded},
                   {"int4": int4_rounded, "float": torch.randn(256, 256, generator=generator)}):
        profiles = {name: SaliencyProfile(normalized_saliency(w, None)) for name, w in layers.items()}
        shares = allocate_sparsity(profiles, 0.5)
        mean = sum(shares[name] * w.numel() for name, w in layers.items()) / sum(w.numel() for w in layers.values())
        assert abs(mean - 0.5) < 1e-6, (list(layers), shares)


def test_error_allocation_stops_at_the_target_after_a_partial_take():
    """The float residue of the budget after a partial take continued into the layer's next hull segment,
    setting its share to that segment's start (15% for a 13.6% target)."""
    from diffusion_accel.prune.allocate import allocate_by_error, error_grid
    grid = error_grid(0.136)
    shares = allocate_by_error({"layer": [1.7 * s ** 2 for s in grid]}, {"layer": 409600}, 0.136, grid)
    assert abs(shares["layer"] - 0.136) < 1e-9
    curves = {"free_a": [0.0] * 20, "free_b": [0.0] * 20, "free_c": [0.0] * 20,
              "costly": [0.0] * 5 + [1.0] * 13 + [0.5, 1.0]}
    sizes = {"free_a": 172, "free_b": 1, "costly": 1804, "free_c": 72}
    shares = allocate_by_error(curves, sizes, 0.40625, error_grid(0.40625))
    assert abs(sum(shares[n] * sizes[n] for n in sizes) / sum(sizes.values()) - 0.40625) < 1e-3


def test_relative_output_error_is_zero_for_the_dense_weight_and_one_for_all_zero():
    from diffusion_accel.prune.allocate import relative_output_error
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=generator)
    hessian, weight = x.T @ x, torch.randn(8, 16, generator=generator)
    assert relative_output_error(weight, weight, hessian) == 0.0
    assert relative_output_error(weight, torch.zeros_like(weight), hessian) == pytest.approx(1.0)
    pruned, _ = obs_prune(weight, hessian, 0.5)
    assert 0 < relative_output_error(weight, pruned, hessian) < relative_output_error(
        weight, weight.masked_fill(magnitude_mask(weight, 0.5, None), 0), hessian)


def test_precomputed_inverse_factor_gives_the_same_result():
    from diffusion_accel.prune.obs import upper_inverse_factor
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(300, 32, generator=generator)
    hessian, weight = x.T @ x, torch.randn(12, 32, generator=generator)
    factor = upper_inverse_factor(hessian, 0.01)
    for sparsity in (0.3, 0.6):
        direct = obs_prune(weight, hessian, sparsity)
        shared = obs_prune(weight, hessian, sparsity, inverse_factor=factor)
        assert torch.equal(direct[0], shared[0]) and torch.equal(direct[1], shared[1])


def test_only_weights_in_the_2_4_pattern_qualify_for_its_sparse_kernels():
    from diffusion_accel.prune.sparse import follows_2_4

    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert follows_2_4(weight)
    assert not follows_2_4(torch.tensor([[1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]]))  # 3 of 4 kept
    assert not follows_2_4(torch.zeros(2, 6))  # no groups of 4


@pytest.mark.parametrize(("owner", "value"), [("global", "tf32"), ("matmul", "tf32"), ("conv", "ieee")])
def test_obs_runs_and_restores_tf32_settings_made_with_the_fp32_precision_api(owner, value):
    """torch >= 2.9 raises on reading the legacy allow_tf32 flags after its fp32_precision ones were set (matmul's to
    "tf32", cuDNN's to "ieee"): every OBS prune (and GPTQ) failed for such a user until session 45."""
    from diffusion_accel.prune.obs import no_tf32

    backends = torch.backends
    knobs = (backends, backends.cuda.matmul, backends.cudnn.conv)
    before = [knob.fp32_precision for knob in knobs]
    target = {"global": backends, "matmul": backends.cuda.matmul, "conv": backends.cudnn.conv}[owner]
    target.fp32_precision = value
    try:
        with no_tf32():
            assert (backends.cudnn.conv if owner == "conv" else backends.cuda.matmul).fp32_precision == "ieee"
        assert target.fp32_precision == value
        _, mask = obs_prune(torch.randn(8, 16), torch.eye(16), 0.5)
        assert int(mask.sum()) == 64
    finally:
        for knob, value in zip(knobs, before):
            knob.fp32_precision = value
