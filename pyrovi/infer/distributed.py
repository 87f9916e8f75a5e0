"""Data-parallel SVI on ``torch.distributed`` (one process per GPU or CPU worker).

Every rank holds the whole model and trains on its own shard of the training cells. After
each backward pass the gradients are averaged across ranks with one all-reduce, so every
rank applies the same Adam update and the parameters stay identical (they start identical:
rank 0's are broadcast first). Each rank's minibatch ELBO is scaled to the full training
set (``n_obs`` = all training cells), so the averaged gradient is an unbiased estimate of
the full-data ELBO gradient with ``world_size`` times the cells per step.

This is DistributedDataParallel's contract written for Pyro: DDP itself hooks a module's
``forward``, which Pyro's model and guide do not go through. Launch with ``torchrun``
(``torchrun --nproc-per-node 4 train.py`` on one machine; add ``--nnodes``,
``--node-rank`` and ``--rdzv-endpoint`` for several), then call
``model.train(..., strategy="ddp")`` in every process; NCCL is used on GPUs, Gloo on CPUs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STRATEGIES = ("single", "ddp")


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run.

    Attributes
    ----------
    rank, world_size
        Rank of this process and number of processes.
    """

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """Whether this process logs, shows progress and writes files (rank 0)."""
        return self.rank == 0

    def shard(self, train_indices: np.ndarray, seed: int = 0) -> np.ndarray:
        """This rank's training cells: an equal share of a permutation common to all ranks.

        The permutation's ``seed`` must be the same on every rank (a fixed number, not the
        global random state, which differs between ranks), or shards would overlap. Shards
        must be the same size, or ranks would run different numbers of steps and wait
        forever in an all-reduce: a rank short of cells repeats one of its own (at most one
        cell per rank).
        """
        permuted = np.random.default_rng(seed).permutation(np.asarray(train_indices))
        shards = np.array_split(permuted, self.world_size)
        mine = shards[self.rank]
        longest = len(shards[0])
        if len(mine) < longest:
            mine = np.concatenate([mine, mine[: longest - len(mine)]])
        return np.sort(mine)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each gradient by its mean over ranks (one flat all-reduce).

        A parameter without a gradient on this rank (unused in this step) contributes zeros,
        so all ranks reduce tensors of the same size.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Average floating-point buffers (batch-norm running statistics) over ranks."""
        with torch.no_grad():
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                    buffer /= self.world_size

    def from_main(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (a new tensor)."""
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


def setup_data_parallel(strategy: str, device: torch.device) -> DataParallel | None:
    """The data-parallel context for ``strategy``, joining the process group if needed.

    Parameters
    ----------
    strategy
        ``"single"`` (one process; returns ``None``) or ``"ddp"``.
    device
        The training device (picks NCCL for CUDA, Gloo otherwise).

    Returns
    -------
    DataParallel or None

    Raises
    ------
    ValueError
        For an unknown strategy, or ``"ddp"`` outside a distributed launch.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if strategy == "single":
        return None
    if not dist.is_available():
        raise ValueError("strategy='ddp' needs a torch build with torch.distributed.")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            raise ValueError(
                "strategy='ddp' runs one process per worker: launch the script with torchrun "
                "(e.g. `torchrun --nproc-per-node 2 train.py`), which sets RANK and "
                "WORLD_SIZE, or call torch.distributed.init_process_group first."
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    context = DataParallel(rank=dist.get_rank(), world_size=dist.get_world_size())
    logger.info("Data-parallel training: rank %d of %d.", context.rank, context.world_size)
    return context


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, the CUDA device of this process (``LOCAL_RANK``); else ``device``."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device
