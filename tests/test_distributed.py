"""Scale-out (docs/conventions.md): spectral-norm layers and the EMA under DistributedDataParallel, two CPU
processes with the gloo backend — u/v buffers, weights and EMA shadows stay identical across
ranks while each rank sees different data."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    import kexue_fast
    from kexue_fast.nn import spectral_norm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
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
        torch.save({"model": model.state_dict(), "ema": ema.state_dict()["shadow"]}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_spectral_norm_and_ema_under_ddp_stay_consistent_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    assert first["model"].keys() == second["model"].keys()
    for key in first["model"]:
        torch.testing.assert_close(first["model"][key], second["model"][key], rtol=0, atol=0, msg=key)
    for key in first["ema"]:
        torch.testing.assert_close(first["ema"][key], second["ema"][key], rtol=0, atol=0, msg=key)
    # the layers did train (the weights moved away from the shared initialisation)
    torch.manual_seed(0)
    from kexue_fast.nn import spectral_norm

    fresh = nn.Sequential(spectral_norm(nn.Linear(8, 16)), nn.ReLU(), spectral_norm(nn.Linear(16, 1)))
    assert not torch.equal(fresh.state_dict()["0.parametrizations.weight.original"], first["model"]["0.parametrizations.weight.original"])


def _fsdp_worker(rank, world, port, out_dir):
    import copy

    import kexue_fast
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
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
    finally:
        dist.destroy_process_group()


def test_ema_of_an_fsdp2_model_averages_the_shards(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"fsdp{rank}.pt")
        assert result["plain"].keys() == result["sharded"].keys()
        for name, t in result["plain"].items():
            torch.testing.assert_close(result["sharded"][name], t, rtol=1e-5, atol=1e-6, msg=name)
