"""The log-det training step of an MLPBranch reads nothing back from the device (issue 13: "roulette
step: no host sync"): during the step — ``residual_logdet``, the loss ``mean(½‖z‖² − logdet)`` and
the gradients in ``x`` and every parameter — no tensor is turned into a Python value (``item``,
``tolist``, ``numpy``, ``bool``/``int``/``float``/``index``) and ``torch.cuda.synchronize`` is not
called. On the CPU such a read costs nothing, but it is the same call that stalls a GPU, so the
calls are counted by wrappers on ``torch.Tensor``."""

import contextlib

import pytest
import torch

from kexue_fast.iresnet import MLPBranch, residual_logdet

#: The ``torch.Tensor`` methods that hand a tensor's values to the host.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def counting_host_reads():
    """Yields ``{name: calls}`` of :data:`HOST_READS` and ``torch.cuda.synchronize`` while open
    (each still does what it did)."""
    counts = {}

    def counted(name, original):
        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        patch.setattr(torch.cuda, "synchronize", counted("torch.cuda.synchronize", torch.cuda.synchronize))
        yield counts


def test_the_counter_sees_every_host_read():
    t, item = torch.tensor([2.0]), torch.Tensor.item
    with counting_host_reads() as counts:
        t.item(), t.tolist(), t.numpy(), bool(t), int(t), float(t), [0, 1, 2][t.long()]
        with contextlib.suppress(Exception):  # no GPU here: the call itself fails, it is counted all the same
            torch.cuda.synchronize()
    assert counts == dict.fromkeys([*HOST_READS, "torch.cuda.synchronize"], 1)
    with counting_host_reads() as counts:
        (t * 2 + 1).sum().exp()  # device work only
    assert counts == {}
    assert torch.Tensor.item is item  # restored on exit


def _step(branch, x, **estimator):
    gx, logdet = residual_logdet(branch, x, seed=3, **estimator)
    z = x + gx
    loss = (0.5 * z.pow(2).sum(1) - logdet).mean()
    return loss, torch.autograd.grad(loss, [x, *branch.parameters()])


ESTIMATORS = {
    "roulette geometric": {"estimator": "roulette", "roulette": "geometric", "roulette_param": 0.5},
    "roulette poisson": {"estimator": "roulette", "roulette": "poisson", "roulette_param": 2.0},
    "series": {"estimator": "series", "n_terms": 5},
}


@pytest.mark.parametrize("estimator", ESTIMATORS.values(), ids=ESTIMATORS)
def test_training_step_of_an_mlp_branch_makes_no_host_read(estimator):
    # Twelve steps, each with its own offset (fresh probes, and for the roulette a fresh length:
    # short and long ones among them), a branch in eval mode (its spectral norm does not iterate:
    # SpectralNormGroup does that once per step, outside the log-det).
    torch.manual_seed(0)
    branch = MLPBranch(3, 16, 3).eval()
    x = torch.randn(32, 3, requires_grad=True)
    losses = []
    for offset in range(12):
        with counting_host_reads() as counts:
            loss, grads = _step(branch, x, offset=offset, **estimator)
        assert counts == {}, f"offset {offset}: host reads {counts}"
        assert len(grads) == 7 and all(torch.isfinite(g).all() for g in grads)
        losses.append(loss.item())
    assert len(set(losses)) == len(losses)  # every step had its own estimate
