"""DistributedDataParallel on the CPU: two gloo processes on loopback train a small SN
discriminator with each API; u, v and weights must be identical on both ranks after
every step (DDP broadcasts rank 0's buffers, so rank 0's u, v win).

Each step is the GAN pattern of pytorch#175024 / #66363: D(real) and D(fake) as two DDP
forwards with broadcast_buffers=True (each overwrites u, v in place), then one backward
of both: no "modified by an inplace operation" error, because the backward reads the
copies of u, v that each forward used."""
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 3


def _worker(rank, world, init_file, api, results):
    # os._exit: gloo's threads can abort the interpreter's normal shutdown ("terminate called
    # without an active exception") after all work is done; the exit code must reflect the work
    try:
        _train(rank, world, init_file, api, results)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _train(rank, world, init_file, api, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        import sn_kernels

        torch.manual_seed(0)  # same init on both ranks; u, v drawn differently below on purpose
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))
        torch.manual_seed(100 + rank)
        sn_kernels.apply_spectral_norm(model, api=api)
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            real, fake = torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 3, 6, 6, generator=g)
            opt.zero_grad()
            loss = torch.relu(1 - ddp(real)).mean() + torch.relu(1 + ddp(fake)).mean()
            loss.backward()
            opt.step()
            state = torch.cat([t.detach().flatten() for t in list(model.parameters()) + list(model.buffers())])
            gathered = [torch.empty_like(state) for _ in range(world)]
            dist.all_gather(gathered, state)
            if rank == 0:
                results.append(max((gathered[0] - x).abs().max().item() for x in gathered[1:]))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="torch.distributed unavailable")
@pytest.mark.parametrize("api", ["hook", "parametrization"])
def test_ddp_two_ranks_stay_identical(api, tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.list()
        procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "store"), api, results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=180)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        assert not alive, "DDP workers timed out"
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        assert len(results) == STEPS
        assert max(results) == 0.0, list(results)
