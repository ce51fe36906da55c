"""kexue_fast.iresnet.fixed_point_inverse, the generic solver for any residual branch: against the
reference on MLP branches, against plain loops on convolutional ones, the per-row active set, the
edges (NaN/inf rows, divergence, max_iter = 0, B = 0), the implicit-function gradient against
autograd through a converged unrolled loop and gradcheck, its memory, and bad input."""

import itertools
import warnings

import pytest
import torch

from kexue_fast import iresnet, reference
from kexue_fast.ops import iresnet as iresnet_ops
from targets import DEVICES, target_params

ACTIVATIONS = ["elu", "relu", "tanh", "softplus", "lipswish"]


def mlp_branch(dims, dtype=torch.float64, c=0.8, seed=0, device="cpu"):
    """Weights and biases of an MLP with every layer's spectral norm ``c`` (so ``Lip(g) <= c``)."""
    gen = torch.Generator().manual_seed(seed)
    weights, biases = [], []
    for n_in, n_out in itertools.pairwise(dims):
        w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
        weights.append((w * c / torch.linalg.matrix_norm(w, 2)).to(dtype).to(device))
        biases.append((0.3 * torch.randn(n_out, generator=gen, dtype=torch.float64)).to(dtype).to(device))
    return weights, biases


def conv_branch(channels=3, hidden=5, c=0.1, seed=0, dtype=torch.float64, device="cpu"):
    """``Conv2d → ELU → Conv2d`` (3×3, same padding) with every weight at most ``c`` in size: a
    contraction for the sizes used here (the tests check that their rows converge)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(channels, hidden, 3, padding=1),
        torch.nn.ELU(),
        torch.nn.Conv2d(hidden, channels, 3, padding=1),
    ).to(dtype=dtype, device=device)
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.mul_(c / layer.weight.abs().amax())
    return net


def per_row_loop(g, y, max_iter, atol, rtol):
    """The rule written out plainly, one row at a time with batches of one (not the code under test)."""
    xs, ns = [], []
    for i in range(y.shape[0]):
        row, n = y[i : i + 1], max_iter
        for k in range(max_iter):
            new = y[i : i + 1] - g(row)
            if not torch.isfinite(new).all():
                row = new
                break
            stop = (new - row).abs().max() <= atol + rtol * new.abs().max()
            row = new
            if stop:
                n = k + 1
                break
        xs.append(row)
        ns.append(n)
    return torch.cat(xs), torch.tensor(ns, dtype=torch.int32)


class Recorder:
    """Wraps ``g``, recording the batch size of every call."""

    def __init__(self, g):
        self.g, self.sizes = g, []

    def __call__(self, x):
        self.sizes.append(x.shape[0])
        return self.g(x)


# --- the solve ---


@pytest.mark.parametrize("target", target_params(DEVICES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dims", [[3, 16, 3], [1, 1], [5, 40, 7, 33, 5]], ids=["depth2", "D1", "depth4"])
def test_mlp_branch_matches_the_reference(target, activation, dims):
    weights, biases = mlp_branch(dims, device=target.device, seed=len(dims))
    y = 2 * torch.randn(40, dims[0], dtype=torch.float64, device=target.device)
    x, n_iter = iresnet.fixed_point_inverse(
        lambda x: iresnet.mlp_residual(x, weights, biases, activation), y, 300, 1e-10, 1e-10
    )
    truth, truth_n = reference.iresnet_inverse(y, weights, biases, activation, 300, 1e-10, 1e-10)
    assert n_iter.dtype == torch.int32 and n_iter.shape == (40,) and n_iter.device == y.device
    assert torch.equal(n_iter.cpu(), truth_n.cpu()), (n_iter.tolist(), truth_n.tolist())
    assert int(n_iter.min()) > 1 and int(n_iter.max()) < 300  # the rows converged, after some work
    torch.testing.assert_close(x, truth, rtol=0, atol=1e-13)


def test_mlp_branch_in_float32_matches_the_native_op():
    weights, biases = mlp_branch([4, 24, 4], torch.float32, seed=3)
    y = torch.randn(64, 4)
    x, n_iter = iresnet.fixed_point_inverse(lambda x: iresnet.mlp_residual(x, weights, biases), y)
    native, native_n = iresnet.iresnet_inverse(y, weights, biases)
    assert ((n_iter - native_n).abs() <= 1).all()  # the stopping boundary under other rounding
    torch.testing.assert_close(x, native, rtol=0, atol=1e-5)
    residual = x + iresnet.mlp_residual(x, weights, biases) - y
    assert residual.abs().max() < 1e-5


@pytest.mark.parametrize("target", target_params(DEVICES))
def test_conv_branch_matches_a_per_row_loop(target):
    net = conv_branch(device=target.device)
    y = torch.randn(6, 3, 5, 4, dtype=torch.float64, device=target.device)
    y[2] *= 30  # rows of different sizes stop at different iterations
    with torch.no_grad():
        x, n_iter = iresnet.fixed_point_inverse(net, y, 200, 1e-11, 1e-11)
        truth, truth_n = per_row_loop(net, y, 200, 1e-11, 1e-11)
        torch.testing.assert_close(x, truth, rtol=0, atol=1e-12)
        assert torch.equal(n_iter.cpu(), truth_n)
        assert (x + net(x) - y).abs().max() < 1e-9
    assert x.shape == y.shape and x.dtype == y.dtype


def test_the_batch_g_sees_shrinks_as_rows_stop():
    weights, biases = mlp_branch([2, 8, 2], c=0.9, seed=1)
    # Rows far from 0 saturate the branch (tanh) and converge fast; rows near 0 see its full gain.
    y = torch.cat([100 * torch.ones(6, 2, dtype=torch.float64), 1e-3 * torch.randn(4, 2, dtype=torch.float64)])
    g = Recorder(lambda x: iresnet.mlp_residual(x, weights, biases, "tanh"))
    with torch.no_grad():
        _, n_iter = iresnet.fixed_point_inverse(g, y, 500, 1e-12, 1e-12)
    assert int(n_iter[:6].max()) < int(n_iter[6:].min()) < 500
    assert g.sizes[0] == 10 and g.sizes[-1] < 10
    assert all(a >= b for a, b in itertools.pairwise(g.sizes))
    # Each row is evaluated once per iteration it ran, and never after it stopped.
    assert sum(g.sizes) == int(n_iter.sum())
    assert len(g.sizes) == int(n_iter.max())


@pytest.mark.parametrize("target", target_params(DEVICES))
def test_nan_and_inf_rows_stop_at_once_and_leave_the_others_alone(target):
    weights, biases = mlp_branch([3, 8, 3], seed=6, device=target.device)
    y = torch.randn(5, 3, dtype=torch.float64, device=target.device)
    y[1, 0], y[3, 2] = float("nan"), float("inf")
    g = Recorder(lambda x: iresnet.mlp_residual(x, weights, biases))
    with pytest.warns(RuntimeWarning, match="2 of 5 rows did not converge"):
        x, n_iter = iresnet.fixed_point_inverse(g, y, 1000, 1e-10, 1e-10)
    assert n_iter[1] == n_iter[3] == 1000
    assert not torch.isfinite(x[1]).all() and not torch.isfinite(x[3]).all()
    assert g.sizes[1] == 3  # the two bad rows left after the first iteration
    clean = [0, 2, 4]
    x_clean, n_clean = iresnet.fixed_point_inverse(g, y[clean], 1000, 1e-10, 1e-10)
    assert torch.equal(x[clean], x_clean) and torch.equal(n_iter[clean], n_clean)
    assert (n_clean < 1000).all()


@pytest.mark.parametrize("tol", [0.0, 1e-6])
def test_a_row_that_overflows_stops_with_max_iter(tol):
    # g(x) = -2x: x_{k+1} = y + 2·x_k doubles until it overflows to inf after ~1000 steps; the
    # row stops there (n_iter = max_iter) instead of running on as NaN; the 0 row converges.
    # With rtol > 0 the last step also passes the stopping test (inf <= atol + rtol·inf): the
    # non-finite rule comes first, as in the native kernels.
    y = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    g = Recorder(lambda x: -2 * x)
    with pytest.warns(RuntimeWarning, match="1 of 2 rows"):
        x, n_iter = iresnet.fixed_point_inverse(g, y, 5000, tol, tol)
    assert n_iter.tolist() == [5000, 1]
    assert torch.isinf(x[0, 0]) and x[1, 0] == 0
    assert 1000 < len(g.sizes) < 1100  # stopped when it overflowed, long before max_iter


def test_divergent_rows_end_at_max_iter_with_one_warning_and_leave_the_others_alone():
    # g(x) = 2·tanh(x) has Lip 2: near 0 the iteration cannot converge (it cycles, bounded);
    # rows with |y| large sit where tanh is flat and converge.
    g = lambda x: 2 * torch.tanh(x)  # noqa: E731
    y = torch.tensor([[0.1, 0.0], [20.0, -15.0], [0.3, 0.2], [-30.0, 12.0]], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, n_iter = iresnet.fixed_point_inverse(g, y, 200, 1e-12, 1e-12)
    assert n_iter[0] == n_iter[2] == 200 and (n_iter[[1, 3]] < 20).all()
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert str(caught[0].message) == iresnet_ops.NOT_CONVERGED.format(n=2, B=4, max_iter=200)
    assert caught[0].filename == __file__  # points at the caller
    x_alone, n_alone = iresnet.fixed_point_inverse(g, y[[1, 3]], 200, 1e-12, 1e-12)
    assert torch.equal(x[[1, 3]], x_alone) and torch.equal(n_iter[[1, 3]], n_alone)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iresnet.fixed_point_inverse(g, y, 200, 1e-12, 1e-12, warn=False)
        iresnet.fixed_point_inverse(g, y[[1, 3]], 200, 1e-12, 1e-12)  # all converge: no warning


def test_float32_rows_below_the_rounding_floor_run_to_max_iter():
    weights, biases = mlp_branch([4, 32, 4], torch.float32, c=0.95, seed=7)
    y = 100 * torch.randn(100, 4, generator=torch.Generator().manual_seed(7))
    with pytest.warns(RuntimeWarning, match="rounding floor"):
        x, n_iter = iresnet.fixed_point_inverse(lambda x: iresnet.mlp_residual(x, weights, biases), y, 300, 1e-9, 0)
    assert 0 < int((n_iter == 300).sum()) < 100
    assert (x + iresnet.mlp_residual(x, weights, biases) - y).abs().max() < 1e-3


def test_max_iter_zero_returns_y_without_calling_g():
    g = Recorder(torch.tanh)
    y = torch.randn(4, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            x, n_iter = iresnet.fixed_point_inverse(g, y, 0)
    assert torch.equal(x, y) and x is not y and n_iter.tolist() == [0] * 4 and n_iter.dtype == torch.int32
    assert g.sizes == []


def test_empty_batch():
    g = Recorder(torch.tanh)
    y = torch.randn(0, 3, 2, requires_grad=True)
    x, n_iter = iresnet.fixed_point_inverse(g, y)
    assert x.shape == (0, 3, 2) and n_iter.shape == (0,) and n_iter.dtype == torch.int32
    assert g.sizes == []
    x.sum().backward()
    assert y.grad.shape == y.shape


def test_one_dimensional_y_has_scalar_rows():
    y = torch.tensor([0.5, 3.0, -2.0], dtype=torch.float64)
    x, n_iter = iresnet.fixed_point_inverse(lambda x: 0.5 * torch.sin(x), y, 200, 1e-13, 0)
    torch.testing.assert_close(x + 0.5 * torch.sin(x), y, rtol=0, atol=1e-12)
    assert x.shape == (3,) and (n_iter < 200).all()


# --- the gradient ---


def unrolled(g, y, n):
    """``n`` plain iterations with autograd through every one (the naive gradient, converged for large ``n``)."""
    x = y
    for _ in range(n):
        x = y - g(x)
    return x


def test_the_returned_x_is_the_solution_exactly_with_or_without_grad():
    net = conv_branch(dtype=torch.float32)
    y = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        x_plain, n_plain = iresnet.fixed_point_inverse(net, y)
    x, n_iter = iresnet.fixed_point_inverse(net, y)
    assert x.requires_grad and not n_iter.requires_grad
    assert torch.equal(x.detach(), x_plain) and torch.equal(n_iter, n_plain)


def test_no_graph_when_nothing_requires_grad():
    y = torch.randn(4, 3)
    x, _ = iresnet.fixed_point_inverse(lambda x: 0.5 * torch.tanh(x), y)
    assert not x.requires_grad and x.grad_fn is None
    x, _ = iresnet.fixed_point_inverse(lambda x: 0.5 * torch.tanh(x), y.requires_grad_())
    assert x.requires_grad


@pytest.mark.parametrize("activation", ["elu", "tanh", "softplus"])
def test_mlp_gradients_match_the_reference_backward(activation):
    weights, biases = mlp_branch([3, 12, 9, 3], seed=2)
    params = [t.clone().requires_grad_() for t in (*weights, *biases)]
    y = torch.randn(30, 3, dtype=torch.float64, requires_grad=True)
    x, _ = iresnet.fixed_point_inverse(
        lambda x: iresnet.mlp_residual(x, params[:3], params[3:], activation), y, 300, 1e-12, 1e-12
    )
    grad_x = torch.randn_like(x)
    got = torch.autograd.grad(x, [y, *params], grad_x)
    ref = reference.iresnet_inverse_backward(grad_x, x.detach(), weights, biases, activation, 300, 1e-12, 1e-12)
    for g, t in zip(got, [ref[0], *ref[1], *ref[2]], strict=True):
        torch.testing.assert_close(g, t, rtol=0, atol=1e-11)


def test_conv_module_gradients_match_autograd_through_a_converged_unrolled_loop():
    net = conv_branch(seed=1)
    y = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y.data[1] *= 20
    params = list(net.parameters())
    assert len(params) == 4
    x, n_iter = iresnet.fixed_point_inverse(net, y, 200, 1e-13, 1e-13)
    assert (n_iter < 200).all()
    grad_x = torch.randn_like(x)
    got = torch.autograd.grad(x, [y, *params], grad_x)
    truth = torch.autograd.grad(unrolled(net, y, 80), [y, *params], grad_x)
    for g, t in zip(got, truth, strict=True):
        torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-11)


def test_gradients_reach_the_tensors_g_closes_over():
    gen = torch.Generator().manual_seed(4)
    w = (0.3 * torch.randn(4, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    base = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    shift = 2 * base  # a non-leaf tensor g uses: the gradient goes on to base
    g = lambda x: torch.tanh(x @ w + shift) * 0.9  # noqa: E731
    y = torch.randn(7, 4, generator=gen, dtype=torch.float64)  # y does not require grad
    x, _ = iresnet.fixed_point_inverse(g, y, 300, 1e-13, 1e-13)
    assert x.requires_grad
    grad_x = torch.randn_like(x)
    got = torch.autograd.grad(x, [w, base], grad_x, retain_graph=True)  # shift's graph is used again below
    truth = torch.autograd.grad(unrolled(g, y, 150), [w, base], grad_x)
    for a, b in zip(got, truth, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_backward_shrinks_the_rows_it_evaluates_and_stays_exact():
    # Saturated rows leave the adjoint solve early; the backward then re-evaluates g on the rows
    # still running only (and the gradient is still that of the unrolled loop).
    weights, biases = mlp_branch([2, 8, 2], c=0.9, seed=1)
    params = [t.clone().requires_grad_() for t in (*weights, *biases)]
    g = Recorder(lambda x: iresnet.mlp_residual(x, params[:2], params[2:], "tanh"))
    y = torch.cat([100 * torch.ones(6, 2, dtype=torch.float64), 1e-3 * torch.randn(2, 2, dtype=torch.float64)])
    y.requires_grad_()
    x, _ = iresnet.fixed_point_inverse(g, y, 500, 1e-13, 1e-13)
    forward_calls = len(g.sizes)
    grad_x = torch.randn_like(x)
    got = torch.autograd.grad(x, [y, *params], grad_x)
    backward_calls = g.sizes[forward_calls:]
    assert backward_calls[0] == 2 and all(n <= 2 for n in backward_calls[1:]) and len(backward_calls) <= 2
    truth = torch.autograd.grad(unrolled(g.g, y, 400), [y, *params], grad_x)
    for a, b in zip(got, truth, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(5)
    w1 = (0.5 * torch.randn(6, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    w2 = (0.5 * torch.randn(3, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    y = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def solve(y, w1, w2):
        return iresnet.fixed_point_inverse(lambda x: 0.8 * torch.tanh(x @ w1.T) @ w2.T, y, 500, 1e-14, 1e-14)[0]

    assert torch.autograd.gradcheck(solve, (y, w1, w2))


def test_gradcheck_float64_conv():
    net = conv_branch(channels=1, hidden=2, seed=3)
    weight = net[0].weight.detach().clone().requires_grad_()
    y = torch.randn(2, 1, 3, 2, dtype=torch.float64, requires_grad=True)

    def solve(y, weight):
        g = lambda x: net[2](net[1](torch.nn.functional.conv2d(x, weight, net[0].bias, padding=1)))  # noqa: E731
        return iresnet.fixed_point_inverse(g, y, 500, 1e-14, 1e-14)[0]

    assert torch.autograd.gradcheck(solve, (y, weight))


def _graph_size(x):
    """The number of nodes of ``x``'s autograd graph."""
    seen, stack = set(), [x.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def _saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while ``fn`` runs, and its result."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(saved), result


def test_memory_does_not_grow_with_the_iterations():
    net = conv_branch(c=0.15)
    y = torch.randn(3, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    sizes, saved = [], []
    for tol in (1e-2, 1e-6, 1e-13):
        nbytes, (x, n_iter) = _saved_bytes(lambda tol=tol: iresnet.fixed_point_inverse(net, y, 500, tol, tol))
        sizes.append(_graph_size(x))
        saved.append(nbytes)
        iterations = int(n_iter.max())
    assert iterations >= 10  # the tight tolerance took many more iterations than the loose one
    assert len(set(sizes)) == 1 and len(set(saved)) == 1, (sizes, saved)
    # The measure sees growth where there is some: the unrolled loop's graph grows with its length.
    short, long = (_saved_bytes(lambda n=n: unrolled(net, y, n)) for n in (2, 8))
    assert long[0] > 3 * short[0] and _graph_size(long[1]) > 2 * _graph_size(short[1])
    # ... and the one evaluation the implicit gradient keeps is what a single step of g keeps.
    one_step, _ = _saved_bytes(lambda: unrolled(net, y, 1))
    assert saved[0] <= one_step + y.numel() * y.element_size()


def test_the_kept_graph_goes_with_x():
    # No reference cycle through the autograd function: dropping x frees the evaluation of g it
    # keeps at once, without the garbage collector, before and after a backward.
    import gc
    import weakref

    w = (0.3 * torch.randn(3, 3)).requires_grad_()
    outputs = []

    def g(x):
        out = torch.tanh(x @ w)
        outputs.append(weakref.ref(out))
        return out

    enabled = gc.isenabled()
    gc.disable()
    try:
        for backward in (False, True):
            outputs.clear()
            x, _ = iresnet.fixed_point_inverse(g, torch.randn(5, 3))
            assert x.requires_grad and outputs[-1]() is not None  # the evaluation at the solution
            if backward:
                x.sum().backward()
            del x
            assert all(ref() is None for ref in outputs)
    finally:
        if enabled:
            gc.enable()


# --- bad input ---


def test_bad_input_names_the_argument():
    y = torch.randn(4, 3)
    g = lambda x: 0.5 * torch.tanh(x)  # noqa: E731
    fp = iresnet.fixed_point_inverse
    with pytest.raises(TypeError, match="g must be callable"):
        fp(torch.randn(3, 3), y)
    with pytest.raises(TypeError, match="y must be a Tensor"):
        fp(g, [[1.0, 2.0]])
    with pytest.raises(TypeError, match="y must have a floating-point dtype"):
        fp(g, torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="y must have a batch dimension"):
        fp(g, torch.tensor(1.0))
    with pytest.raises(ValueError, match="y must have at least one element in every row"):
        fp(g, torch.randn(4, 0))
    with pytest.raises(ValueError, match="g must return its input's shape"):
        fp(lambda x: x[:, :2], y)
    with pytest.raises(ValueError, match="g must return its input's shape"):
        fp(lambda x: x.sum(0), y)
    with pytest.raises(TypeError, match="g must return its input's dtype"):
        fp(lambda x: x.double(), y)
    with pytest.raises(TypeError, match="g must return a Tensor"):
        fp(lambda x: 0.0, y)
    for name in ("atol", "rtol"):
        with pytest.raises(ValueError, match=name):
            fp(g, y, **{name: -1e-6})
        with pytest.raises(ValueError, match=name):
            fp(g, y, **{name: float("nan")})
        with pytest.raises(TypeError, match=name):
            fp(g, y, **{name: "1e-6"})
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="max_iter"):
            fp(g, y, max_iter=bad)


def test_bad_output_of_g_in_the_backward_is_named_too():
    # The backward re-evaluates g on the rows still running; a g that then returns another shape
    # is named as failing there.
    in_backward = []
    g = lambda x: x[:, :1] if in_backward else 0.5 * torch.tanh(x)  # noqa: E731
    y = torch.cat([torch.full((3, 2), 50.0, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)])
    x, _ = iresnet.fixed_point_inverse(g, y.requires_grad_(), 100, 1e-12, 1e-12)
    in_backward.append(True)
    with pytest.raises(ValueError, match="in the backward"):
        torch.autograd.grad(x, y, torch.ones_like(x))


def test_public_names():
    import kexue_fast

    assert iresnet.mlp_residual is reference.iresnet.mlp_residual
    assert iresnet.iresnet_inverse is iresnet_ops.iresnet_inverse is kexue_fast.iresnet_inverse
    assert kexue_fast.iresnet is iresnet
    assert iresnet.NOT_CONVERGED is iresnet_ops.NOT_CONVERGED
