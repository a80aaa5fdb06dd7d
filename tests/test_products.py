"""core.products.linear: oneDNN's float32 product where it answers as torch's does, torch's otherwise."""

import pytest
import torch

from core import products


@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64), (1, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_equals_torch_linear(shape, with_bias):
    generator = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(*shape, generator=generator), torch.randn(300, 64, generator=generator), torch.randn(300, generator=generator)
    bias = bias if with_bias else None
    with torch.no_grad():
        ours, theirs = products.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias)
    assert ours.shape == theirs.shape == (*shape[:-1], 300)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_slices_of_a_weight_and_a_non_contiguous_input():
    generator = torch.Generator().manual_seed(2)
    weight, x = torch.randn(1000, 48, generator=generator), torch.randn(48, 9, generator=generator).T  # x: a transposed view
    with torch.no_grad():
        torch.testing.assert_close(products.linear(x, weight[300:700]), x @ weight[300:700].T, rtol=1e-5, atol=1e-5)


def test_a_product_autograd_must_see_is_torchs():
    x, weight = torch.randn(4, 8), torch.randn(30, 8, requires_grad=True)
    products.linear(x, weight).sum().backward()
    torch.testing.assert_close(weight.grad, x.sum(0).expand(30, 8))  # d(sum of x W^T)/dW: every row is x summed over rows


def test_onednn_is_used_here_and_agrees():
    """On these machines (CPU torch with oneDNN) the fast product is there and passes its check."""
    products.onednn_agrees.cache_clear()
    assert products.onednn_agrees()


@pytest.mark.parametrize("fault", ["wrong numbers", "missing"])
def test_a_product_that_disagrees_or_is_missing_is_never_used(monkeypatch, fault):
    def wrong(rows, weight, bias):
        if fault == "missing":
            raise RuntimeError("no such operator")
        return torch.nn.functional.linear(rows, weight, bias) * 1.001

    monkeypatch.setattr(products, "_onednn_linear", wrong)
    products.onednn_agrees.cache_clear()
    try:
        assert not products.onednn_agrees()
        x, weight = torch.randn(6, 16), torch.randn(40, 16)
        with torch.no_grad():
            assert torch.equal(products.linear(x, weight), torch.nn.functional.linear(x, weight))  # torch's own, bit for bit
    finally:
        products.onednn_agrees.cache_clear()
