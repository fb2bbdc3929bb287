"""φ (the DC removal) against a real orthonormal 2-D DCT-II over the spatial grid (SCALEKD.md, DFM)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.fft import dctn, idctn

from scalekd.dc import dc_component, dc_energy_fraction, dc_removed, dc_removed_map

# (B, C, H, W): square, non-square both ways, a 1-row grid, an odd prime grid
MAP_SHAPES = [(2, 3, 4, 4), (1, 5, 3, 7), (2, 2, 8, 5), (1, 4, 1, 6), (3, 1, 7, 7), (1, 2, 14, 14)]


def _phi_by_dct(x: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    """DCT⁻¹(σ(DCT(x))): orthonormal 2-D DCT-II over `axes`, zero the (0, 0) coefficient, invert."""
    coeffs = dctn(x, type=2, axes=axes, norm="ortho")
    index = [slice(None)] * x.ndim
    for a in axes:
        index[a] = 0
    coeffs[tuple(index)] = 0.0
    return idctn(coeffs, type=2, axes=axes, norm="ortho")


@pytest.mark.parametrize("shape", MAP_SHAPES)
def test_dc_removed_map_equals_zeroing_the_dct_dc_coefficient(shape):
    x = np.random.default_rng(1).normal(size=shape) * 3.0 + 1.5  # a real DC offset to remove
    expected = _phi_by_dct(x, axes=(-2, -1))
    got64 = dc_removed_map(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got64, expected, rtol=0, atol=1e-12)
    got32 = dc_removed_map(torch.from_numpy(x).float()).numpy()
    np.testing.assert_allclose(got32, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape", MAP_SHAPES)
def test_dc_removed_tokens_equals_dct_on_the_token_grid(shape):
    b, c, h, w = shape
    tokens = np.random.default_rng(2).normal(size=(b, h * w, c)) + 0.7
    grid = tokens.reshape(b, h, w, c)  # token n = i·W + j
    expected = _phi_by_dct(grid, axes=(1, 2)).reshape(b, h * w, c)
    got = dc_removed(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_dc_removed_tokens_agrees_with_map_form_on_the_same_grid():
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    tokens = x.flatten(2).transpose(1, 2)  # (B, H·W, C)
    torch.testing.assert_close(dc_removed(tokens), dc_removed_map(x).flatten(2).transpose(1, 2), rtol=0, atol=1e-14)


def test_dc_component_plus_dc_removed_gives_back_the_tokens_and_phi_is_idempotent():
    t = torch.randn(3, 12, 4, dtype=torch.float64) + 2.0
    dc = dc_component(t)
    assert dc.shape == (3, 1, 4)
    torch.testing.assert_close(dc_removed(t) + dc, t, rtol=0, atol=1e-14)
    torch.testing.assert_close(dc_removed(dc_removed(t)), dc_removed(t), rtol=0, atol=1e-14)
    # φ leaves nothing at zero frequency: every channel's spatial mean is 0
    assert dc_removed(t).mean(dim=1).abs().max().item() < 1e-14


def test_dc_component_is_the_dct_dc_coefficient_over_sqrt_n():
    b, h, w, c = 2, 3, 4, 5
    t = np.random.default_rng(3).normal(size=(b, h * w, c)) + 1.0
    coeff00 = dctn(t.reshape(b, h, w, c), type=2, axes=(1, 2), norm="ortho")[:, 0, 0, :]  # (B, C)
    got = dc_component(torch.from_numpy(t)).numpy()[:, 0, :]
    np.testing.assert_allclose(got, coeff00 / np.sqrt(h * w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", MAP_SHAPES)
def test_dc_energy_fraction_equals_dct_dc_energy_over_total_energy(shape):
    b, c, h, w = shape
    tokens = np.random.default_rng(4).normal(size=(b, h * w, c)) + np.linspace(-1, 2, c)
    coeffs = dctn(tokens.reshape(b, h, w, c), type=2, axes=(1, 2), norm="ortho")
    dc_energy = (coeffs[:, 0, 0, :] ** 2).sum(axis=-1)
    total = (coeffs**2).sum(axis=(1, 2, 3))  # = Σ x² by Parseval
    np.testing.assert_allclose(total, (tokens**2).sum(axis=(1, 2)), rtol=1e-12)
    got = dc_energy_fraction(torch.from_numpy(tokens))
    assert got.shape == (b,)
    np.testing.assert_allclose(got.numpy(), dc_energy / total, rtol=1e-5, atol=1e-7)


def test_dc_energy_fraction_is_one_for_constant_maps_and_zero_after_phi():
    const = torch.ones(2, 9, 3) * torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(dc_energy_fraction(const), torch.ones(2))
    zero_mean = dc_removed(torch.randn(2, 9, 3))
    assert dc_energy_fraction(zero_mean).abs().max().item() < 1e-6
    # an all-zero map has no energy: the fraction is 0, not NaN
    torch.testing.assert_close(dc_energy_fraction(torch.zeros(1, 4, 2)), torch.zeros(1))


def test_the_dc_view_loss_removes_the_dc_in_float32_whatever_the_cap_outputs():
    """Under a GPU's bf16 autocast the DC-view CAP may hand on bf16 tokens: φ is taken in float32, so a
    large per-channel mean does not cost the small spatial part its bits."""
    from scalekd.losses import dual_view_loss, feature_loss

    g = torch.Generator().manual_seed(0)
    final = torch.randn(2, 49, 16, generator=g)
    dc_view = (torch.randn(2, 49, 16, generator=g) + 20.0).bfloat16()  # the mean 20× the spread
    as_bf16 = dual_view_loss(final, dc_view, final, dc_removed(final), 1.0, 1.0)[1]
    as_float = dual_view_loss(final, dc_view.float(), final, dc_removed(final), 1.0, 1.0)[1]
    in_bf16 = feature_loss(dc_removed(dc_view), dc_removed(final))  # what subtracting in bf16 gives
    assert torch.equal(as_bf16, as_float)
    assert not torch.allclose(in_bf16, as_float, rtol=1e-5)  # measured: 1.5e-4 apart (φ itself: 3 % relative)
