"""The i-ResNet flow's modules (kexue_fast/iresnet/flow.py, docs/iresnet_flow.md "Modules"): the flow's density
against the change-of-variables formula with the Jacobian of the whole map computed independently, the inverse,
sampling, ActNorm's initialisation, state dicts, SpectralNormGroup, EMA, torch.compile, bad input. DDP: in
test_distributed.py."""

import copy
import math

import pytest
import torch

import kexue_fast
from kexue_fast.iresnet import ActNorm, InvertibleResBlock, IResNetFlow, residual_logdet
from kexue_fast.nn import SpectralNormGroup
from kexue_fast.reference.iresnet import mlp_residual

SMALL = dict(n_layers=2, coeff=0.8)  # Lip(g) <= 0.64 per block


def data(n=64, dim=3, dtype=torch.float64, seed=0):
    """Rows far from N(0, I) (shifted and scaled per feature), so ActNorm's initialisation matters."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 3.0, dim, dtype=dtype)
    return torch.randn(n, dim, generator=generator, dtype=dtype) * scale + torch.arange(dim, dtype=dtype)


def initialised(flow, x):
    """``flow`` after its ActNorm initialisation on ``x`` (one training-mode forward), in eval mode."""
    flow.train()
    with torch.no_grad():
        flow(x)
    return flow.eval()


def flow_map(flow, x):
    """``z = f(x)`` rebuilt from the flow's parameters and the reference MLP (not from the modules' forwards)."""
    for actnorm, block in zip(flow.actnorms, flow.blocks):
        x = (x + actnorm.bias) * torch.exp(actnorm.log_scale)
        x = x + mlp_residual(x, *block.branch.mlp_parameters())
    return x


def change_of_variables(flow, x, create_graph=False):
    """``ln N(f(x); 0, I) + ln |det ∂f/∂x|`` per row, the Jacobian of the whole map by autograd, row by row."""
    z = flow_map(flow, x)
    out = []
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda r: flow_map(flow, r[None])[0], x[i], create_graph=create_graph)
        out.append(torch.linalg.slogdet(jac).logabsdet)
    base = -0.5 * z.square().sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)
    return base + torch.stack(out)


def test_log_prob_with_exact_log_dets_is_the_change_of_variables_formula():
    torch.manual_seed(0)
    flow = initialised(IResNetFlow(3, 3, 8, estimator="exact", **SMALL).double(), data())
    x = data(8, seed=1)
    z, _ = flow(x)
    torch.testing.assert_close(z, flow_map(flow, x), rtol=1e-12, atol=1e-12)
    got = flow.log_prob(x)
    expected = change_of_variables(flow, x, create_graph=True)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # exact log-dets are differentiated exactly: the parameters' gradients are those of the formula
    params = list(flow.parameters())
    got_grads = torch.autograd.grad(got.sum(), params)
    expected_grads = torch.autograd.grad(expected.sum(), params)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)


def test_series_log_prob_is_close_to_the_exact_one_for_a_small_lipschitz_constant():
    torch.manual_seed(0)
    settings = dict(n_layers=2, coeff=0.5)  # Lip(g) <= 0.25: the tail after 8 terms is ~1e-6
    exact = initialised(IResNetFlow(3, 2, 8, estimator="exact", **settings).double(), data())
    series = IResNetFlow(3, 2, 8, n_terms=8, n_probes=512, probe="rademacher", **settings).double().eval()
    series.load_state_dict(exact.state_dict())
    x = data(32, seed=1)
    with torch.no_grad():
        error = series.log_prob(x, offset=1) - exact.log_prob(x)
    # 512 Rademacher probes: a standard error of about 0.007 per row
    assert error.abs().max() < 0.05
    assert error.mean().abs() < 0.01


ESTIMATOR_SETTINGS = [
    {},
    {"n_terms": 3, "n_probes": 2, "probe": "rademacher"},
    {"estimator": "roulette", "n_exact_terms": 1, "roulette": "poisson", "roulette_param": 1.5},
]


@pytest.mark.parametrize("settings", ESTIMATOR_SETTINGS, ids=["series", "series-rademacher", "roulette-poisson"])
def test_block_i_draws_its_probes_at_seed_plus_i_and_the_given_offset(settings):
    torch.manual_seed(0)
    flow = initialised(IResNetFlow(2, 3, 8, seed=10, **settings, **SMALL), data(dim=2, dtype=torch.float32))
    x = data(16, dim=2, dtype=torch.float32, seed=1)
    with torch.no_grad():
        expected, h = torch.zeros(16), x
        for i, (actnorm, block) in enumerate(zip(flow.actnorms, flow.blocks)):
            h = (h + actnorm.bias) * torch.exp(actnorm.log_scale)
            gh, logdet = residual_logdet(block.branch, h, seed=10 + i, offset=7, **settings)
            expected += actnorm.log_scale.sum() + logdet
            h = h + gh
        z, got = flow(x, offset=7)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(z, h)
        assert torch.equal(flow.log_prob(x, offset=7), flow.log_prob(x, offset=7))
        assert not torch.equal(flow.log_prob(x, offset=7), flow.log_prob(x, offset=8))


def test_a_flow_without_actnorm_is_its_blocks():
    torch.manual_seed(0)
    flow = IResNetFlow(2, 2, 8, actnorm=False, estimator="exact", **SMALL).double().eval()
    assert flow.actnorms is None and not any(isinstance(m, ActNorm) for m in flow.modules())
    x = data(8, dim=2)
    with torch.no_grad():
        h, expected = x, torch.zeros(8, dtype=torch.float64)
        for block in flow.blocks:
            h, logdet = block(h)
            expected += logdet
        z, got = flow(x)
        torch.testing.assert_close(z, h, rtol=0, atol=0)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(flow.inverse(z, atol=1e-12, rtol=1e-12), x, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "dtype,tol,atol", [(torch.float64, 1e-12, 1e-9), (torch.float32, 1e-6, 1e-4)], ids=["float64", "float32"]
)
def test_inverse_undoes_forward_to_the_solver_tolerance(dtype, tol, atol):
    # A block's stopping rule leaves an error of at most Lip/(1 − Lip)·(atol + rtol·‖x‖∞) ≈ 2·tol·‖x‖∞, which the
    # inverses of the earlier blocks and ActNorms amplify (each by at most 1/(1 − Lip) ≈ 3 and exp(−log_scale)).
    torch.manual_seed(0)
    flow = initialised(IResNetFlow(3, 3, 16, **SMALL).to(dtype), data(dtype=dtype))
    x = data(32, dtype=dtype, seed=1)
    with torch.no_grad():
        z, _ = flow(x)
        back, n_iter = flow.inverse(z, atol=tol, rtol=tol, return_n_iter=True)
        torch.testing.assert_close(back, x, rtol=0, atol=atol)
        assert n_iter.shape == (32, 3) and n_iter.dtype == torch.int32
        assert ((n_iter > 0) & (n_iter < 100)).all()
        noise = torch.randn(32, 3, dtype=dtype)
        torch.testing.assert_close(flow(flow.inverse(noise, atol=tol, rtol=tol))[0], noise, rtol=0, atol=atol)


def test_block_inverse_undoes_the_block():
    torch.manual_seed(0)
    block = InvertibleResBlock(3, 16, coeff=0.9).double().eval()
    x = data(16)
    z, _ = block(x)
    back, n_iter = block.inverse(z, atol=1e-12, rtol=1e-12, return_n_iter=True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    assert n_iter.shape == (16,) and (n_iter < 100).all()
    # differentiable by the implicit function theorem: ∂x/∂z = (I + J_g)⁻¹
    z0 = z[:1].detach().requires_grad_()
    jac = torch.autograd.functional.jacobian(lambda r: block.inverse(r[None], atol=1e-13, rtol=1e-13)[0], z0[0])
    forward_jac = torch.autograd.functional.jacobian(lambda r: block(r[None])[0][0], back[0].detach())
    torch.testing.assert_close(jac @ forward_jac, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-8)


def test_sample_inverts_philox_base_noise():
    torch.manual_seed(0)
    flow = initialised(IResNetFlow(2, 2, 8, **SMALL), data(dim=2, dtype=torch.float32))
    with torch.no_grad():
        samples = flow.sample(256, seed=3, offset=1)
        assert samples.shape == (256, 2) and samples.dtype == torch.float32
        assert torch.isfinite(samples).all()
        assert torch.equal(samples, flow.sample(256, seed=3, offset=1))
        assert not torch.equal(samples, flow.sample(256, seed=3, offset=2))
        noise = kexue_fast.philox_normal((256, 2), 3, 1)
        torch.testing.assert_close(flow(samples)[0], noise, rtol=0, atol=1e-4)
        assert flow.sample(0).shape == (0, 2)


def test_actnorm_initialisation_gives_zero_mean_and_unit_variance():
    x = data(256, dim=4)
    actnorm = ActNorm(4).double()
    z, logdet = actnorm(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-5)
    expected_logdet = -0.5 * torch.log(x.var(0, unbiased=False)).sum()
    torch.testing.assert_close(logdet, expected_logdet.expand(256), rtol=0, atol=1e-5)
    assert bool(actnorm.initialized)
    # later batches do not initialise again
    state = copy.deepcopy(actnorm.state_dict())
    actnorm(data(64, dim=4, seed=5) * 10)
    for key, value in actnorm.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_actnorm_does_not_initialise_in_eval_mode():
    actnorm = ActNorm(2).eval()
    x = data(8, dim=2, dtype=torch.float32)
    z, logdet = actnorm(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(8))
    assert not bool(actnorm.initialized)


def test_actnorm_inverse_is_exact():
    torch.manual_seed(0)
    actnorm = ActNorm(3).double()
    actnorm(data())
    with torch.no_grad():
        actnorm.log_scale.add_(torch.randn(3, dtype=torch.float64))
    x = data(16, seed=2)
    torch.testing.assert_close(actnorm.inverse(actnorm(x)[0]), x, rtol=0, atol=1e-14)
    z = torch.randn(16, 3, dtype=torch.float64)
    torch.testing.assert_close(actnorm(actnorm.inverse(z))[0], z, rtol=0, atol=1e-14)


def test_state_dict_round_trip_keeps_the_actnorm_initialisation():
    torch.manual_seed(0)
    trained = initialised(IResNetFlow(3, 2, 8, **SMALL).double(), data())
    torch.manual_seed(1)  # other weights and vectors
    fresh = IResNetFlow(3, 2, 8, **SMALL).double().eval()
    fresh.load_state_dict(trained.state_dict())
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = data(16, seed=3) * 5  # a batch whose statistics would give another initialisation
    with torch.no_grad():
        torch.testing.assert_close(fresh.log_prob(x, offset=2), trained.log_prob(x, offset=2), rtol=0, atol=0)
        fresh.train()(x)  # training mode: no initialisation again
    for key, value in trained.state_dict().items():
        if key.startswith("actnorms."):
            assert torch.equal(fresh.state_dict()[key], value), key


def training_steps(flow, x, n_steps, group=None, ema=None):
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    losses = []
    for step in range(n_steps):
        if group is not None:
            group.refresh()
        loss = -flow.log_prob(x, offset=step).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update()
        losses.append(float(loss.detach()))
    return losses


def test_spectral_norm_group_refreshes_every_layer_and_the_layers_do_not_iterate_themselves():
    torch.manual_seed(0)
    flow = IResNetFlow(2, 2, 8, **SMALL)
    x = data(128, dim=2, dtype=torch.float32)
    group = SpectralNormGroup(flow)
    assert len(group.layers) == 2 * 2
    losses = training_steps(flow, x, 5, group)
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    vectors = [sn._u.clone() for _, _, sn in group.layers]
    flow.log_prob(x, offset=9).mean().backward()  # training-mode forward: the vectors stay
    assert all(torch.equal(sn._u, u) for (_, _, sn), u in zip(group.layers, vectors))
    sigmas = group.refresh()
    assert not all(torch.equal(sn._u, u) for (_, _, sn), u in zip(group.layers, vectors))
    assert sigmas.shape == (4,)
    for block in flow.blocks:  # the normalised weights keep the bound: σ(W) <= coeff (up to the power iteration)
        for w in block.branch.mlp_parameters()[0]:
            assert torch.linalg.matrix_norm(w.detach(), 2) <= 0.8 * (1 + 1e-3)


def test_ema_of_the_flow_averages_and_its_weights_give_a_log_prob():
    torch.manual_seed(0)
    x = data(128, dim=2, dtype=torch.float32)
    flow = initialised(IResNetFlow(2, 2, 8, **SMALL), x).train()
    ema = kexue_fast.EMA(flow, decay=0.5)
    before = {name: t.detach().clone() for name, t in flow.state_dict().items()}
    training_steps(flow, x, 1, SpectralNormGroup(flow), ema)
    after = flow.state_dict()
    for name in ("actnorms.0.bias", "blocks.1.branch.layers.0.parametrizations.weight.original"):
        torch.testing.assert_close(ema.shadow[name], 0.5 * before[name] + 0.5 * after[name])
    for name in ("blocks.0.branch.layers.1.parametrizations.weight.0._u", "actnorms.1.initialized"):
        assert torch.equal(ema.shadow[name], after[name])  # copied, never averaged
    averaged = copy.deepcopy(flow).eval()
    averaged.load_state_dict({name: ema.averaged_value(name) for name in flow.state_dict()})
    trained = {name: t.clone() for name, t in flow.state_dict().items()}
    flow.eval()
    with torch.no_grad(), ema.applied():
        log_prob = flow.log_prob(x, offset=3)
    assert torch.isfinite(log_prob).all()
    with torch.no_grad():
        torch.testing.assert_close(log_prob, averaged.log_prob(x, offset=3), rtol=0, atol=0)
        assert not torch.equal(log_prob, flow.log_prob(x, offset=3))
    for name, t in flow.state_dict().items():  # the training weights are back
        assert torch.equal(t, trained[name]), name


def test_compiled_training_step_has_no_graph_break_and_matches_eager():
    torch.manual_seed(0)
    x = data(64, dim=2, dtype=torch.float32)
    flow = initialised(IResNetFlow(2, 2, 8, **SMALL), x).train()  # ActNorm initialised eagerly
    group = SpectralNormGroup(flow)
    group.refresh()
    params = list(flow.parameters())

    def loss(x, offset):
        return -flow.log_prob(x, offset).mean()

    compiled = torch.compile(loss, fullgraph=True)  # raises on a graph break
    for offset in (3, 4):  # the second offset: a new probe stream in the same (or a dynamic) graph
        expected = loss(x, offset)
        expected_grads = torch.autograd.grad(expected, params)
        got = compiled(x, offset)
        got_grads = torch.autograd.grad(got, params)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_compile_of_an_uninitialised_flow_initialises_eagerly_and_fullgraph_says_why_it_breaks():
    x = data(64, dim=2, dtype=torch.float32)
    flow = IResNetFlow(2, 1, 8, **SMALL)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"run one training-mode forward before torch\.compile"):
        torch.compile(lambda x: flow.log_prob(x), fullgraph=True, backend="aot_eager")(x)
    assert not bool(flow.actnorms[0].initialized)
    torch.compile(lambda x: flow.log_prob(x), backend="aot_eager")(x)  # a graph break: the initialisation, eagerly
    assert bool(flow.actnorms[0].initialized)
    torch.testing.assert_close(flow.actnorms[0].bias.detach(), -x.mean(0))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: IResNetFlow(0, 2, 8), "dim"),
        (lambda: IResNetFlow(2.0, 2, 8), "dim"),
        (lambda: IResNetFlow(2, 0, 8), "n_blocks"),
        (lambda: IResNetFlow(2, True, 8), "n_blocks"),
        (lambda: IResNetFlow(2, 2, -1), "hidden"),
        (lambda: IResNetFlow(2, 2, 8, n_layers=0), "n_layers"),
        (lambda: IResNetFlow(2, 2, 8, coeff=1.0), "coeff"),
        (lambda: IResNetFlow(2, 2, 8, estimator="hutchinson"), "estimator"),
        (lambda: IResNetFlow(2, 2, 8, n_terms=0), "n_terms"),
        (lambda: IResNetFlow(2, 2, 8, seed=1.5), "seed"),
        (lambda: IResNetFlow(2, 2, 8, actnorm=1), "actnorm"),
        (lambda: InvertibleResBlock(2, 0), "hidden"),
        (lambda: InvertibleResBlock(2, 8, probe="uniform"), "probe"),
        (lambda: InvertibleResBlock(2, 8, n_probes=0), "n_probes"),
        (lambda: ActNorm(0), "dim"),
        (lambda: ActNorm(2, eps=0.0), "eps"),
    ],
)
def test_bad_settings_raise_naming_the_argument_before_building_anything(make, match):
    rng = torch.get_rng_state()
    with pytest.raises((ValueError, TypeError), match=match):
        make()
    assert torch.equal(torch.get_rng_state(), rng)  # no layer was initialised


def test_bad_input_raises_naming_the_argument():
    flow = IResNetFlow(2, 2, 8, **SMALL)
    for bad in (torch.zeros(4, 3), torch.zeros(4), torch.zeros(4, 2, 1)):
        with pytest.raises(ValueError, match=r"IResNetFlow: x must have shape \(B, 2\)"):
            flow.log_prob(bad)
        with pytest.raises(ValueError, match=r"IResNetFlow.inverse: z must have shape \(B, 2\)"):
            flow.inverse(bad)
    with pytest.raises(TypeError, match="x must be a Tensor"):
        flow(None)
    with pytest.raises(TypeError, match="x must have the module's dtype"):
        flow(torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="offset"):
        flow.eval()(torch.zeros(4, 2), offset=0.5)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        flow.sample(-1)
    with pytest.raises(ValueError, match=r"InvertibleResBlock: x must have shape \(B, 2\)"):
        flow.blocks[0](torch.zeros(4, 3))


def test_actnorm_initialisation_on_a_single_row_raises_and_changes_nothing():
    actnorm = ActNorm(2)
    with pytest.raises(ValueError, match="at least 2 rows"):
        actnorm(torch.ones(1, 2))
    assert not bool(actnorm.initialized)
    assert torch.equal(actnorm.bias, torch.zeros(2)) and torch.equal(actnorm.log_scale, torch.zeros(2))
    actnorm(data(8, dim=2, dtype=torch.float32))  # a proper batch still initialises
    assert bool(actnorm.initialized)
