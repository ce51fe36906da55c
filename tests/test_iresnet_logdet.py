r"""kexue_fast.iresnet.residual_logdet / logdet (kexue_fast/iresnet/logdet.py; the estimators are stated
in kexue_fast/reference/iresnet.py) against an independent oracle: the Jacobian of the branch from
``torch.autograd.functional.jacobian``, its powers, and ``slogdet``.

The branches are random contractive MLPs: every weight is a Gaussian matrix scaled to spectral norm
exactly ``c`` and the activation (ELU) is 1-Lipschitz, so ``Lip(g) ≤ c^L``. Each runs as a plain
callable (the generic autograd path) and as an ``MLPBranch`` holding the same weights (the fused MLP
path), and both must pass the same tests. The statistical tests have fixed seeds; their tolerances
are several standard errors computed from the samples themselves (the sample means they test are
means of i.i.d. draws: rows with their own probes, or calls at distinct offsets).
"""

import math
from itertools import pairwise

import pytest
import torch

from kexue_fast import philox_normal
from kexue_fast.iresnet import MLPBranch, logdet, mlp_residual, residual_logdet
from kexue_fast.iresnet.logdet import roulette_coefficients

DIM, HIDDEN, N_LAYERS = 3, 16, 3
LIP = 0.5  # the Lipschitz bound of the branches of the statistical tests
KINDS = ["callable", "MLPBranch"]
Z = 4.0  # standard errors allowed for one tested mean


def contractive_mlp(lip, seed, dim=DIM, hidden=HIDDEN, n_layers=N_LAYERS):
    """float64 ``(weights, biases)`` of an MLP ``dim → hidden → … → dim`` whose every weight has
    spectral norm exactly ``lip^(1/n_layers)``."""
    gen = torch.Generator().manual_seed(seed)
    widths = [dim] + [hidden] * (n_layers - 1) + [dim]
    weights, biases = [], []
    for n_in, n_out in pairwise(widths):
        w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
        weights.append(w * (lip ** (1 / n_layers) / torch.linalg.matrix_norm(w, ord=2)))
        biases.append(0.5 * torch.randn(n_out, generator=gen, dtype=torch.float64))
    return weights, biases


def make_branch(kind, weights, biases, dtype=torch.float64):
    """``(g, params)``: the MLP branch of ``weights``, ``biases`` (ELU) as a plain callable or as an
    ``MLPBranch`` (``coeff`` the largest spectral norm of the weights, eval mode, power iteration
    converged: its normalised weights are those weights), and the tensors it is differentiable in."""
    if kind == "callable":
        params = [t.to(dtype).requires_grad_() for t in (*weights, *biases)]
        n = len(weights)
        return (lambda z: mlp_residual(z, params[:n], params[n:], "elu")), params
    coeff = max(float(torch.linalg.matrix_norm(w, ord=2)) for w in weights)
    branch = MLPBranch(weights[0].shape[1], weights[0].shape[0], len(weights), coeff=coeff).to(dtype)
    with torch.no_grad():
        for layer, w, b in zip(branch.layers, weights, biases):
            layer.parametrizations.weight.original.copy_(w)
            layer.parametrizations.weight[0].power_method(layer.parametrizations.weight.original, 300)
            layer.bias.copy_(b)
    branch.eval()
    for layer, w in zip(branch.layers, weights):  # W / max(1, σ/c) with σ ≤ ‖W‖₂ ≤ c leaves W as it is
        torch.testing.assert_close(layer.weight.detach(), w.to(dtype), rtol=1e-6, atol=0)
    return branch, list(branch.parameters())


def contractive_branch(kind, lip=LIP, seed=0, dtype=torch.float64):
    """A branch of :func:`make_branch` with the weights of :func:`contractive_mlp`: ``Lip(g) ≤ lip``."""
    return make_branch(kind, *contractive_mlp(lip, seed), dtype=dtype)


def points(n, seed=1, dtype=torch.float64, row=(DIM,)):
    return torch.randn(n, *row, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- The oracle ---


def jacobian(g, x, create_graph=False):
    """``J_g`` of every row, ``(B, D, D)`` (``D`` the elements of a row): ``g`` treats rows
    independently, so the Jacobian of the sum of its rows holds them all."""
    B, D = x.shape[0], x[0].numel()
    jac = torch.autograd.functional.jacobian(lambda z: g(z).sum(0), x, create_graph=create_graph)
    return jac.reshape(D, B, D).transpose(0, 1)


def exact(J):
    """``ln |det(I + J)|`` per row."""
    return torch.linalg.slogdet(torch.eye(J.shape[-1], dtype=J.dtype) + J).logabsdet


def series_terms(J, v, n):
    """``(−1)^{k+1} vᵀ J^k v / k`` for ``k = 1 … n``: ``(n, B)``."""
    terms, u = [], v.unsqueeze(-1)
    for k in range(1, n + 1):
        u = J @ u  # J^k v
        terms.append((-1) ** (k + 1) * (v * u.squeeze(-1)).sum(-1) / k)
    return torch.stack(terms)


def trace_series(J, n):
    """``Σ_{k=1}^{n} (−1)^{k+1} tr(J^k) / k`` per row: the expectation of ``n`` terms for any probe law with
    ``E[v vᵀ] = I``."""
    return sum((-1) ** (k + 1) * torch.linalg.matrix_power(J, k).diagonal(0, -2, -1).sum(-1) / k
               for k in range(1, n + 1))  # fmt: skip


def neumann_surrogate(J, v, coefficients):
    """``nᵀ J v`` with ``n = Σ_k c_k (−1)^{k+1} (Jᵀ)^{k−1} v`` held constant: its gradient is the
    estimator's gradient for the probe ``v`` (reference module docstring)."""
    n = sum(c * (-1) ** (k + 1) * torch.linalg.matrix_power(J.detach().transpose(1, 2), k - 1) @ v.unsqueeze(-1)
            for k, c in enumerate(coefficients, 1))  # fmt: skip
    return (n.squeeze(-1) * (J @ v.unsqueeze(-1)).squeeze(-1)).sum(-1)


def philox_probes(x, n_probes, probe, seed, offset):
    """The probes as the module docstring states them: ``philox_normal((n_probes, *x.shape))`` at
    ``(seed, offset)`` in float32, their signs for Rademacher."""
    noise = philox_normal([n_probes, *x.shape], seed, offset, torch.float32).to(x.dtype)
    return noise.sign() if probe == "rademacher" else noise


def survival(n_exact_terms, roulette, param, smallest):
    """``P(N ≥ k)``, ``k = 1, 2, …`` while at least ``smallest``, for ``N = n_exact_terms + M``:
    ``P(M ≥ m) = (1 − p)^m`` (geometric), ``Σ_{j ≥ m} e^{−λ} λ^j / j!`` (Poisson, summed from ``m`` up)."""
    out, m = [1.0] * n_exact_terms, 1
    while True:
        if roulette == "geometric":
            s = (1 - param) ** m
        else:
            s = sum(math.exp(j * math.log(param) - param - math.lgamma(j + 1)) for j in range(m, m + 200))
        if s < smallest:
            return out
        out.append(s)
        m += 1


def grads(output, inputs):
    return torch.autograd.grad(output, inputs, allow_unused=True, materialize_grads=True)


def assert_all_close(got, want, rtol, atol, what):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{what} [{i}]: {m}")


# --- Exact ---


@pytest.mark.parametrize("kind", KINDS)
def test_exact_value_and_gradient_match_the_oracle(kind):
    g, params = contractive_branch(kind, lip=0.9, seed=2)
    x = points(6).requires_grad_()
    gx, got = residual_logdet(g, x, estimator="exact")
    J = jacobian(g, x, create_graph=True)
    want = exact(J)
    torch.testing.assert_close(gx, g(x), rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet(g, x, estimator="exact"), want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(6, dtype=torch.float64)
    inputs = [x, *params]
    assert_all_close(grads(got @ upstream, inputs), grads(want @ upstream, inputs), 1e-10, 1e-12, "gradient")


# --- Series: the single-probe formula, its gradient, its bias ---


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("probe", "n_probes"), [("gaussian", 1), ("gaussian", 3), ("rademacher", 2)])
def test_series_value_is_the_power_series_of_the_probes(kind, probe, n_probes):
    # The estimate is, for each row, the mean over its probes of Σ_k (−1)^{k+1} vᵀ J^k v / k.
    g, _ = contractive_branch(kind, lip=0.9, seed=3)
    x = points(5)
    n_terms, seed, offset = 6, 11, 7
    got = logdet(g, x, n_terms, n_probes, "series", probe, seed, offset)
    J = jacobian(g, x)
    probes = philox_probes(x, n_probes, probe, seed, offset)
    want = torch.stack([series_terms(J, v, n_terms).sum(0) for v in probes]).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_series_gradient_is_the_neumann_estimate(kind):
    # ∂ of nᵀ J v with n = Σ_k (−1)^{k+1} (Jᵀ)^{k−1} v constant, in x and in every weight and bias.
    g, params = contractive_branch(kind, lip=0.9, seed=4)
    x = points(5).requires_grad_()
    n_terms, n_probes, seed, offset = 5, 2, 3, 1
    _, got = residual_logdet(g, x, n_terms, n_probes, "series", "gaussian", seed, offset)
    J = jacobian(g, x, create_graph=True)
    probes = philox_probes(x, n_probes, "gaussian", seed, offset)
    surrogate = torch.stack([neumann_surrogate(J, v, [1.0] * n_terms) for v in probes]).mean(0)
    upstream = torch.randn(5, dtype=torch.float64)
    inputs = [x, *params]
    assert_all_close(grads(got @ upstream, inputs), grads(surrogate @ upstream, inputs), 1e-10, 1e-12, "gradient")


def test_series_on_rows_of_any_shape():
    # The generic path takes rows (B, 2, 2): the same formula on the flattened rows.
    weights, biases = contractive_mlp(0.9, seed=5, dim=4)

    def g(z):
        return mlp_residual(z.flatten(1), weights, biases, "elu").view_as(z)

    x = points(5, seed=2, row=(2, 2))
    got = logdet(g, x, n_terms=4, seed=1, offset=2)
    want = series_terms(jacobian(g, x), philox_probes(x, 1, "gaussian", 1, 2)[0].flatten(1), 4).sum(0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet(g, x, estimator="exact"), exact(jacobian(g, x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_series_bias_is_the_tail_and_shrinks_like_lip_to_the_n(kind, probe):
    # Every row of x is one of two points, each with its own probes: the mean over a point's rows
    # estimates the series' expectation Σ_{k≤n} (−1)^{k+1} tr(J^k)/k, which differs from the exact
    # log-det by the tail Σ_{k>n}, |tail| ≤ D·Lip^{n+1} / ((n+1)(1 − Lip)).
    g, _ = contractive_branch(kind, seed=6)
    x0 = points(2, seed=3)
    rows = 4096
    x = x0.repeat_interleave(rows, 0)
    J = jacobian(g, x0)
    truth = exact(J)
    for n in range(1, 9):
        samples = logdet(g, x, n_terms=n, probe=probe, seed=n).view(2, rows)
        mean, se = samples.mean(1), samples.std(1) / math.sqrt(rows)
        expectation = trace_series(J, n)
        assert ((mean - expectation).abs() <= Z * se).all(), f"n={n}: mean {mean} vs {expectation} (se {se})"
        bound = DIM * LIP ** (n + 1) / ((n + 1) * (1 - LIP))
        assert ((expectation - truth).abs() <= bound).all()  # the oracle's own tail, a check of the setup
        assert ((mean - truth).abs() <= bound + Z * se).all(), f"n={n}: error {mean - truth} > {bound} + {Z} se"


# --- Roulette ---


@pytest.mark.parametrize(("roulette", "param"), [("geometric", 0.5), ("geometric", 0.2), ("poisson", 2.0),
                                                 ("poisson", 0.7)])  # fmt: skip
@pytest.mark.parametrize("n_exact_terms", [0, 2])
def test_roulette_coefficients_are_one_on_average(roulette, param, n_exact_terms):
    # c_k = [U < P(N ≥ k)] / P(N ≥ k): E[c_k] = 1 over U ~ Uniform(0, 1), nonzero on a prefix
    # k ≤ N with N ≥ n_exact_terms.
    law = survival(n_exact_terms, roulette, param, smallest=1e-9)
    grid = 2000
    total = None
    for i in range(grid):
        c = roulette_coefficients(torch.tensor((i + 0.5) / grid, dtype=torch.float64), n_exact_terms, roulette,
                                  param)  # fmt: skip
        assert c.dtype == torch.float64 and len(c) >= len(law)
        nonzero = c != 0
        n = int(nonzero.sum())
        assert n >= n_exact_terms and nonzero[:n].all(), f"U={(i + 0.5) / grid}: not a prefix {c}"
        total = c[: len(law)] if total is None else total + c[: len(law)]
    mean = total / grid
    for k, s in enumerate(law):  # a stratified grid: |mean − 1| ≤ 1/(grid·s)
        assert abs(mean[k] - 1) <= 1 / (grid * s) + 1e-12, f"E[c_{k + 1}] = {mean[k]}"
    for k, s in enumerate(law):  # the switch sits at P(N ≥ k) exactly, with the weight 1/P(N ≥ k)
        below = roulette_coefficients(torch.tensor(s * (1 - 1e-9), dtype=torch.float64), n_exact_terms, roulette,
                                      param)  # fmt: skip
        assert below[k] == pytest.approx(1 / s, rel=1e-9)
        if s < 1:
            above = roulette_coefficients(torch.tensor(s * (1 + 1e-9), dtype=torch.float64), n_exact_terms,
                                          roulette, param)  # fmt: skip
            assert above[k] == 0


ROULETTES = [("geometric", 0.5, 2), ("geometric", 0.3, 0), ("poisson", 2.0, 2), ("poisson", 1.0, 1)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("roulette", "param", "n_exact_terms"), ROULETTES)
def test_roulette_value_is_a_partial_sum_with_a_length_from_the_law(kind, roulette, param, n_exact_terms):
    # On the linear branch g(z) = a·z (J = aI) the terms c_k (−1)^{k+1} a^k ‖v‖²/k of distinct
    # lengths N never agree, so each call's N can be read back from its value: the value must be
    # the roulette series of the probes cut at some N ≥ n_exact_terms, and P(N ≥ k) over the calls
    # must be the law's, within Z binomial standard errors.
    a = 0.57  # not 0.6: there c_5 a^5/5 = c_6 a^6/6 for p = 0.5, and N = 4 and 6 give the same value
    g, _ = make_branch(kind, [a * torch.eye(DIM, dtype=torch.float64)], [torch.zeros(DIM, dtype=torch.float64)])
    x, seed, calls = points(4), 9, 400
    J = jacobian(g, x)
    law = survival(n_exact_terms, roulette, param, smallest=1e-13)  # beyond every N the Philox uniform can draw
    weights = torch.tensor([1 / s for s in law], dtype=torch.float64)
    lengths = []
    for offset in range(calls):
        got = logdet(g, x, estimator="roulette", seed=seed, offset=offset, n_exact_terms=n_exact_terms,
                     roulette=roulette, roulette_param=param)  # fmt: skip
        v = philox_probes(x, 1, "gaussian", seed, offset)[0]
        partial = torch.cat([x.new_zeros(1, 4), (weights[:, None] * series_terms(J, v, len(weights))).cumsum(0)])
        matches = ((partial - got).abs() <= 1e-12 * (1 + got.abs())).all(1)  # partial[N]: the first N terms
        assert int(matches.sum()) == 1, f"offset {offset}: {got} is no partial sum of the roulette series"
        lengths.append(int(matches.nonzero()))
    lengths = torch.tensor(lengths)
    assert (lengths >= n_exact_terms).all()
    for k, s in enumerate(survival(n_exact_terms, roulette, param, smallest=1e-3), 1):
        observed = float((lengths >= k).double().mean())
        assert abs(observed - s) <= Z * math.sqrt(s * (1 - s) / calls) + 1 / calls, f"P(N ≥ {k}): {observed} vs {s}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("roulette", ["geometric", "poisson"])
def test_roulette_is_unbiased(kind, roulette):
    # Two points, 16 rows each with their own probes; the mean over 400 calls at distinct offsets
    # (independent draws of the probes and of N) within Z standard errors of the exact log-det.
    # (Geometric p = 0.5 at Lip 0.5: the variance Σ_k term_k² / P(N ≥ k) is finite.)
    g, _ = contractive_branch(kind, seed=7)
    x0 = points(2, seed=4)
    rows, calls = 16, 400
    x = x0.repeat_interleave(rows, 0)
    means = torch.stack(
        [logdet(g, x, estimator="roulette", seed=5, offset=offset, roulette=roulette).view(2, rows).mean(1)
         for offset in range(calls)]
    )  # fmt: skip
    mean, se = means.mean(0), means.std(0) / math.sqrt(calls)
    truth = exact(jacobian(g, x0))
    assert ((mean - truth).abs() <= Z * se).all(), f"mean {mean} vs exact {truth} (se {se})"
