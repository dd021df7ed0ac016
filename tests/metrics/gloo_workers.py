"""Process bodies for the 2-rank gloo tests of tests/metrics, in a module that imports no more than they need:
each spawned rank imports this file, and the test modules' imports would triple its start-up time."""
import os

import torch
import torch.distributed as dist

from tcae_ldm.metrics.fid import FrechetStats


def reduce_worker(rank, world_size, init_method, out_dir):
    """One rank's running statistics over its own rows (4 on rank 0, 7 on rank 1), all-reduced twice."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        x = torch.randn(11, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        stats = FrechetStats(3)
        stats.update(x[:4] if rank == 0 else x[4:])
        first, second = stats.reduced(), stats.reduced()
        torch.save({"count": second.count, "sum": second.sum, "outer": second.outer, "first": first.count,
                    "local": stats.count}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()
