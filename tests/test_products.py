"""core.products.linear: oneDNN's float32 product where it answers as torch's does, torch's otherwise."""

import pickle
import time

import pytest
import torch

from core import load_model, products, save_random_gpt2


@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64), (1, 64), (64,), (0, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_equals_torch_linear(shape, with_bias):
    generator = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(*shape, generator=generator), torch.randn(300, 64, generator=generator), torch.randn(300, generator=generator)
    bias = bias if with_bias else None
    with torch.no_grad():
        ours, theirs = products.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias)
    assert ours.shape == theirs.shape == (*shape[:-1], 300)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_a_weight_held_as_in_by_out_as_conv1d_and_the_engine_hold_theirs():
    generator = torch.Generator().manual_seed(3)
    x, held = torch.randn(6, 48, generator=generator), torch.randn(48, 200, generator=generator)  # [in, out]; .T: [out, in], not contiguous
    with torch.no_grad():
        torch.testing.assert_close(products.linear(x, held.T), x @ held, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(products.linear(x, held[:, 50:150].T), x @ held[:, 50:150], rtol=1e-5, atol=1e-5)  # neither layout: copied


def test_slices_of_a_weight_and_a_non_contiguous_input():
    generator = torch.Generator().manual_seed(2)
    weight, x = torch.randn(1000, 48, generator=generator), torch.randn(48, 9, generator=generator).T  # x: a transposed view
    with torch.no_grad():
        torch.testing.assert_close(products.linear(x, weight[300:700]), x @ weight[300:700].T, rtol=1e-5, atol=1e-5)


def test_a_product_whose_weight_needs_its_gradient_is_torchs():
    x, weight = torch.randn(4, 8), torch.randn(30, 8, requires_grad=True)
    products.linear(x, weight).sum().backward()
    torch.testing.assert_close(weight.grad, x.sum(0).expand(30, 8))  # d(sum of x W^T)/dW: every row is x summed over rows


@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
@pytest.mark.parametrize("held", ["out x in", "in x out"])
def test_a_product_differentiated_in_its_input_runs_on_onednn_and_has_torchs_gradient(monkeypatch, activation, held):
    """The input needs a gradient, the weight and bias none (edge attribution's backward pass): both the product and
    its gradient are oneDNN's products, and they equal torch's (value and d/dx)."""
    generator = torch.Generator().manual_seed(5)
    x, weight, bias = torch.randn(2, 7, 64, generator=generator), torch.randn(300, 64, generator=generator) / 4, torch.randn(300, generator=generator)
    weight = weight if held == "out x in" else weight.T.contiguous().T  # the engine's and Conv1D's [in, out] weights, as their .T
    upstream = torch.randn(2, 7, 300, generator=generator)
    assert products.onednn_agrees() and products.onednn_agrees(activation)  # checked (and cached) before the spy below
    calls = []
    monkeypatch.setattr(products, "_onednn_linear", lambda *args: calls.append(args[1].shape) or torch.ops.mkldnn._linear_pointwise(*args[:3], "none", [], ""))
    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = products.linear(ours_x, weight, bias, activation)
    (ours * upstream).sum().backward()
    theirs = products.ACTIVATIONS[activation](torch.nn.functional.linear(theirs_x, weight, bias))
    (theirs * upstream).sum().backward()
    assert calls == [(300, 64), (64, 300)]  # the product, then its gradient: W^T's product
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=1e-5, atol=1e-4)


def test_onednn_is_used_here_and_agrees():
    """On these machines (CPU torch with oneDNN) the fast product, and the product with each activation fused,
    are there and pass their checks (so the tests of `linear` below test oneDNN's)."""
    products.onednn_agrees.cache_clear()
    assert all(products.onednn_agrees(activation) for activation in products.ACTIVATIONS)


def test_a_prepared_weight_is_read_from_its_copy_and_answers_as_torch():
    """prepare keeps oneDNN's layout of a weight beside it (here: oneDNN and its layouts pass their checks);
    products of any row count, with and without an activation, answer as torch's."""
    products.prepared_agrees.cache_clear()
    assert products.prepared_agrees()
    generator = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(300, 64, generator=generator) / 4, torch.randn(300, generator=generator)
    assert products.prepare(weight) is weight and products.prepared(weight)
    assert not products.prepared(weight.T.T) and not products.prepared(weight[:100])  # another view reads the weight as it is
    with torch.no_grad():
        for shape in [(1, 64), (5, 64), (2, 7, 64), (64,), (0, 64), (129, 64), (1000, 64)]:
            x = torch.randn(*shape, generator=generator)
            for activation in ("none", "gelu_tanh"):
                ours = products.linear(x, weight, bias, activation)
                torch.testing.assert_close(ours, products.ACTIVATIONS[activation](torch.nn.functional.linear(x, weight, bias)), rtol=1e-5, atol=1e-5)


def test_a_prepared_weight_changed_in_place_or_given_other_storage_is_read_as_it_is_now():
    """A copy prepared before the weight changed would answer for the old weight: it is dropped."""
    generator = torch.Generator().manual_seed(6)
    weight, x = torch.randn(300, 64, generator=generator), torch.randn(5, 64, generator=generator)
    view = products.prepare(weight[50:250])  # a view shares its base's version counter
    products.prepare(weight)
    weight.mul_(-2)
    with torch.no_grad():
        torch.testing.assert_close(products.linear(x, weight), x @ weight.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(products.linear(x, view), x @ weight[50:250].T, rtol=1e-5, atol=1e-5)
    assert not products.prepared(weight) and not products.prepared(view)
    swapped = products.prepare(torch.randn(300, 64, generator=generator))
    swapped.data = torch.randn(300, 64, generator=generator)  # other storage, the same version
    with torch.no_grad():
        torch.testing.assert_close(products.linear(x, swapped), x @ swapped.T, rtol=1e-5, atol=1e-5)


def test_a_layout_that_disagrees_or_is_missing_is_never_prepared(monkeypatch):
    for reorder in (lambda weight: weight.flip(0), lambda weight: torch.ops.mkldnn.no_such_operator(weight)):
        monkeypatch.setattr(products, "_reorder", reorder)
        products.prepared_agrees.cache_clear()
        try:
            weight = torch.randn(40, 16)
            assert not products.prepared_agrees() and products.prepare(weight) is weight and not products.prepared(weight)
        finally:
            products.prepared_agrees.cache_clear()


def test_the_fast_engine_reads_its_weights_prepared(tiny_model):
    from core.patching.fast import Engine

    engine = Engine(tiny_model)
    weights = [*engine.qkv_weights, *engine.out_weights, *engine.in_weights, *engine.mlp_out_weights, engine.final_q_weight, engine.final_kv_weight]
    assert all(products.prepared(weight) for weight in weights + [weight for _, weight, _ in engine.unembed_blocks])
    tokens = torch.tensor([[50256, 464, 3290, 318, 287, 262, 1748, 286]])
    with torch.no_grad():
        logits, _ = engine.run_with_cache(tokens, (), range(tokens.shape[-1]))
        torch.testing.assert_close(logits, tiny_model(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu"])
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64), (0, 64)])
def test_a_product_with_an_activation_equals_torchs_activation_of_torchs_product(shape, activation):
    generator = torch.Generator().manual_seed(4)
    x, weight, bias = torch.randn(*shape, generator=generator), torch.randn(300, 64, generator=generator) / 4, torch.randn(300, generator=generator)
    with torch.no_grad():
        ours = products.linear(x, weight, bias, activation)
        product = torch.nn.functional.linear(x, weight, bias)
    theirs = products.ACTIVATIONS[activation](product)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if len(x):
        assert not torch.equal(theirs, product)  # an activation was applied
        assert (product < -3).any() and (product > 3).any()  # both tails of its curve were tested


@pytest.mark.parametrize("fault", ["wrong numbers", "missing"])
def test_a_product_that_disagrees_or_is_missing_is_never_used(monkeypatch, fault):
    def wrong(rows, weight, bias, activation="none"):
        if fault == "missing":
            raise RuntimeError("no such operator")
        return products.ACTIVATIONS[activation](torch.nn.functional.linear(rows, weight, bias)) * 1.001

    monkeypatch.setattr(products, "_onednn_linear", wrong)
    products.onednn_agrees.cache_clear()
    try:
        assert not products.onednn_agrees() and not products.onednn_agrees("gelu_tanh")
        x, weight = torch.randn(6, 16), torch.randn(40, 16)
        with torch.no_grad():
            assert torch.equal(products.linear(x, weight), torch.nn.functional.linear(x, weight))  # torch's own, bit for bit
            fused = products.linear(x, weight, activation="gelu_tanh")
            assert torch.equal(fused, torch.nn.functional.gelu(torch.nn.functional.linear(x, weight), approximate="tanh"))
    finally:
        products.onednn_agrees.cache_clear()


def test_a_loaded_model_computes_its_products_on_onednn_and_answers_as_with_torchs(tmp_path, monkeypatch):
    """load_model routes the bridge's nn.Linear and Conv1D products (core.products.route_products): a forward
    pass computes them on oneDNN (counted: on some machines oneDNN's small products equal torch's bit for bit,
    so the numbers alone cannot tell), and its logits are torch's own to float32 rounding (computed again
    with the products falling back to torch's)."""
    monkeypatch.setattr(products, "_routing_pays", lambda *timed: True)  # a model this small runs about as fast either way
    model = load_model(save_random_gpt2(tmp_path, n_layers=2, n_heads=4, d_model=64, n_ctx=64, seed=3))
    assert products.routed(model)
    tokens = torch.tensor([[50256, 464, 3290, 318, 287, 262, 1748, 286]])
    onednn, calls = products._onednn_linear, []

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return onednn(*args, **kwargs)

    monkeypatch.setattr(products, "_onednn_linear", counted)
    with torch.no_grad():
        ours = model(tokens)
        routed_calls = len(calls)
        monkeypatch.setattr(products, "onednn_agrees", lambda activation="none": False)
        theirs = model(tokens)
    # per layer q, k, v, the attention's output and the MLP's two; then the unembedding
    assert routed_calls == 2 * 6 + 1 and calls[-1] == (50257, 64) and len(calls) == routed_calls  # oneDNN's products, then none...
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # ...the same numbers


def test_routing_is_undone_where_the_model_answers_otherwise(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(5, 16)
    monkeypatch.setattr(products, "onednn_agrees", lambda activation="none": True)
    monkeypatch.setattr(products, "_onednn_linear", lambda rows, weight, bias, activation="none": torch.nn.functional.linear(rows, weight, bias) + 0.01)
    assert not products.route_products(model, lambda: model(x))
    assert not products.routed(model) and all("forward" not in vars(module) for module in model.modules())
    monkeypatch.undo()
    assert products.route_products(model, lambda: model(x), timed=False) and products.routed(model)
    assert pickle.loads(pickle.dumps(model))[0].forward.func is products._linear_forward  # a routed model still pickles


@pytest.mark.parametrize("faster", [True, False])
def test_routing_is_kept_only_where_it_runs_faster(faster):
    """Routed products that answer alike are kept only if the check runs faster with them (timed each way, the
    two taking turns): here the check waits 20 ms on the side that should lose."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x, seen = torch.randn(5, 16), []

    def check():
        routed_now = products.routed(model)
        seen.append(routed_now)
        if routed_now != faster:
            time.sleep(0.02)
        return model(x)

    assert products.route_products(model, check) == faster == products.routed(model)
    turns = [[False, True], [True, False]] * products.DEFAULTS.routing_timings  # who goes first alternates
    assert seen == [False, True] + sum(turns[: products.DEFAULTS.routing_timings], [])  # the answers compared, then the two timed
    assert all(("forward" in vars(module)) == faster for module in model if isinstance(module, torch.nn.Linear))
    if faster:  # routed already: nothing is timed again
        assert products.route_products(model, check) and len(seen) == 2 + 2 * products.DEFAULTS.routing_timings


def test_load_model_keeps_torchs_products_where_onednn_would_be_slower(tmp_path, monkeypatch):
    monkeypatch.setattr(products, "_routing_pays", lambda *timed: False)
    model = load_model(save_random_gpt2(tmp_path, n_layers=1, n_heads=2, d_model=32, n_ctx=32, seed=4))
    assert not products.routed(model)


def test_a_check_that_raises_leaves_the_model_as_it_was():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32))

    def broken():
        raise RuntimeError("a model that cannot run this prompt")

    assert not products.route_products(model, broken) and not products.routed(model)
    assert "forward" not in vars(model[0])


@pytest.mark.parametrize("spread", [1.0, 30.0, 300.0])  # 300: most differences from the max underflow float32's normal range
def test_logsumexp_equals_torchs_bit_for_bit(spread):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 7, 2048, generator=generator) * spread
    expected = torch.logsumexp(logits, -1)
    assert torch.equal(products.logsumexp(logits), expected)
    assert torch.equal(products.logsumexp(logits, logits.amax(-1)), expected)  # the maxima given
    assert torch.equal(products.logsumexp(torch.zeros(2, 5)), torch.logsumexp(torch.zeros(2, 5), -1))  # ties: log(5)
