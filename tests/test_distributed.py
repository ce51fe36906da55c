"""Scale-out (docs/conventions.md): spectral-norm layers and the EMA under DistributedDataParallel and FSDP2, two CPU
processes with the gloo backend — u/v buffers, weights and EMA shadows stay identical across ranks while each rank
sees different data.

Each rank runs in `_rank`, which ends the process with os._exit once its work is saved. Leaving through the
interpreter's normal shutdown killed a rank with SIGABRT in about one run in six: a gloo worker thread frees each
finished all-reduce's work object, and that takes the GIL (the work holds the Python thread-local state it was
started under). torch keeps the default process group, and so its worker threads, alive after
destroy_process_group (torch.distributed.nn.functional holds group.WORLD as a default argument) until the
interpreter's final garbage collection. A worker still waiting for the GIL when the interpreter finalises is ended
by CPython with pthread_exit, and that unwinding through a noexcept destructor calls std::terminate ("terminate
called without an active exception").
"""

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import kexue_fast
from kexue_fast.iresnet import IResNetFlow
from kexue_fast.nn import SpectralNormGroup, spectral_norm

WORLD = 2


def _rank(rank, store, target, args):
    """One process of the group: `target(rank, *args)` under a gloo group that meets through a file in the test's
    own tmp_path (no TCP port to pick: a free port chosen here could be taken before rank 0 listens on it)."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        target(rank, *args)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see the module docstring: no interpreter shutdown while gloo's threads may still want the GIL


def _spawn(target, tmp_path, *args):
    mp.spawn(_rank, args=(str(tmp_path / "store"), target, args), nprocs=WORLD, join=True)


def _ddp_training(rank, out_dir):
    torch.manual_seed(0)  # same initial weights and u, v on every rank
    model = nn.Sequential(spectral_norm(nn.Linear(8, 16)), nn.ReLU(), spectral_norm(nn.Linear(16, 1)))
    ddp = nn.parallel.DistributedDataParallel(model)
    ema = kexue_fast.EMA(ddp, decay=0.9)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # different data on each rank
    for _ in range(3):
        loss = ddp(torch.randn(4, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
    result = {"model": model.state_dict(), "ema": ema.state_dict()["shadow"]}
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))


def test_spectral_norm_and_ema_under_ddp_stay_consistent_across_ranks(tmp_path):
    _spawn(_ddp_training, tmp_path, str(tmp_path))
    first, second = (torch.load(tmp_path / f"{r}.pt") for r in range(WORLD))
    assert first["model"].keys() == second["model"].keys()
    for key in first["model"]:
        torch.testing.assert_close(first["model"][key], second["model"][key], rtol=0, atol=0, msg=key)
    for key in first["ema"]:
        torch.testing.assert_close(first["ema"][key], second["ema"][key], rtol=0, atol=0, msg=key)
    # the layers did train (the weights moved away from the shared initialisation)
    torch.manual_seed(0)
    fresh = nn.Sequential(spectral_norm(nn.Linear(8, 16)), nn.ReLU(), spectral_norm(nn.Linear(16, 1)))
    key = "0.parametrizations.weight.original"
    assert not torch.equal(fresh.state_dict()[key], first["model"][key])


def _flow_data(rank, step):
    """Rank `rank`'s batch at `step`: different on every rank, far from N(0, I) (ActNorm's initialisation matters)."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(32, 2, generator=generator) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -3.0])


def _ddp_flow_training(rank, out_dir):
    torch.manual_seed(0)  # same initial weights and u, v on every rank
    flow = IResNetFlow(2, 2, 8, n_layers=2, coeff=0.8)
    ddp = nn.parallel.DistributedDataParallel(flow)
    group = SpectralNormGroup(flow)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    for step in range(3):
        group.refresh()
        z, logdet = ddp(_flow_data(rank, step), offset=step)  # the first forward initialises the ActNorms
        if step == 0:
            initial_bias = flow.actnorms[0].bias.detach().clone()
        loss = -(flow.base_log_prob(z) + logdet).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"model": flow.state_dict(), "initial_bias": initial_bias}, os.path.join(out_dir, f"flow{rank}.pt"))


def test_iresnet_flow_under_ddp_keeps_weights_vectors_and_actnorm_identical_across_ranks(tmp_path):
    _spawn(_ddp_flow_training, tmp_path, str(tmp_path))
    first, second = (torch.load(tmp_path / f"flow{r}.pt") for r in range(WORLD))
    assert first["model"].keys() == second["model"].keys()
    assert any(key.endswith("._u") for key in first["model"]) and "actnorms.1.initialized" in first["model"]
    for key in first["model"]:
        torch.testing.assert_close(first["model"][key], second["model"][key], rtol=0, atol=0, msg=key)
    # ActNorm initialised from the batches of both ranks together (bias = −their mean), then trained
    both = torch.cat([_flow_data(rank, 0) for rank in range(WORLD)])
    torch.testing.assert_close(first["initial_bias"], -both.mean(0))
    assert bool(first["model"]["actnorms.0.initialized"])
    torch.manual_seed(0)
    fresh = IResNetFlow(2, 2, 8, n_layers=2, coeff=0.8).state_dict()
    key = "blocks.0.branch.layers.0.parametrizations.weight.original"
    assert not torch.equal(fresh[key], first["model"][key])


def _fsdp_training(rank, out_dir):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    sharded = copy.deepcopy(plain)
    fully_shard(sharded)
    emas = [kexue_fast.EMA(m, decay=0.8) for m in (plain, sharded)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, sharded)]
    torch.manual_seed(7)  # the same data on every rank: the sharded model follows the plain one
    for _ in range(3):
        x = torch.randn(4, 8)
        for model, ema, opt in zip((plain, sharded), emas, opts):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            ema.update()
    full = {name: t.full_tensor() for name, t in emas[1].shadow.items()}
    torch.save({"plain": emas[0].shadow, "sharded": full}, os.path.join(out_dir, f"fsdp{rank}.pt"))


def test_ema_of_an_fsdp2_model_averages_the_shards(tmp_path):
    _spawn(_fsdp_training, tmp_path, str(tmp_path))
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"fsdp{rank}.pt")
        assert result["plain"].keys() == result["sharded"].keys()
        for name, t in result["plain"].items():
            torch.testing.assert_close(result["sharded"][name], t, rtol=1e-5, atol=1e-6, msg=name)


def _backward_then_leave(rank):
    """Ends right after a DDP backward, the main thread keeping the GIL (no thread switch for 1000 s), so the gloo
    workers are still waiting for it to free the last all-reduces when the rank leaves."""
    sys.setswitchinterval(1000.0)
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(*[nn.Linear(3, 3) for _ in range(8)]), bucket_cap_mb=1e-6)
    ddp(torch.ones(3)).sum().backward()


@pytest.mark.parametrize("attempt", range(4))
def test_a_rank_leaving_right_after_its_last_all_reduce_exits_cleanly(tmp_path, attempt):
    # Through the interpreter's shutdown about half of these runs died with SIGABRT (the module docstring says why).
    _spawn(_backward_then_leave, tmp_path)
