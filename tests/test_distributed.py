"""Scale-out (SPEC §0): spectral-norm layers and the EMA under DistributedDataParallel, two CPU
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
