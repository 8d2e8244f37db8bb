"""The ranks of a tensor/pipeline-parallel job and the few messages they exchange.

Layout (Megatron's): rank = stage * tp + tp_rank, so the tp ranks of one pipeline
stage are neighbours (one node, fast links). Every operation goes through a process
group created here with the job's timeout, and a failure (a peer died, raised, or
stopped answering) becomes a DistributedError that names the operation and the fix,
so no rank waits forever: gloo and NCCL both give up after the group's timeout.
"""
from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..errors import DistributedError


def launched_world_size() -> int:
    """The world size torchrun (or the user's init_process_group) set up; 1 outside a job."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class ParallelContext:
    """This rank's place in the job and its process groups (not data: holds live groups)."""

    tp: int
    pp: int
    rank: int
    timeout_s: float
    tp_group: Any = None
    world_group: Any = None
    stage_ranks: list[list[int]] = field(default_factory=list)  # stage -> global ranks of its tp group

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def peer_in_stage(self, stage: int) -> int:
        """The global rank holding this rank's tp shard in `stage`."""
        return stage * self.tp + self.tp_rank

    # -- messages ---------------------------------------------------------------
    def _failed(self, what: str, err: Exception) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} (pipeline stage {self.stage}, tensor-parallel rank {self.tp_rank}): {what} "
            f"failed: another rank died, raised or did not answer within timeout_s={self.timeout_s:g}. "
            f"Look at the other ranks' logs for the first error. ({type(err).__name__}: {str(err)[:300]})")

    def _run(self, what: str, call, *args, **kwargs):
        """One torch.distributed call; a failure becomes a DistributedError naming `what`."""
        try:
            return call(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as err:
            raise self._failed(what, err) from err

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the tensor-parallel group, in place."""
        self._run("all_reduce over the tensor-parallel group", dist.all_reduce, t, group=self.tp_group)
        return t

    def all_gather_last(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every tp rank's `t` along the last dim (rank order); sizes may differ."""
        width = max(sizes)
        padded = t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.tp)]
        self._run("all_gather over the tensor-parallel group", dist.all_gather, parts, padded.contiguous(),
                  group=self.tp_group)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    def isend(self, t: torch.Tensor, dst: int):
        return self._run(f"sending activations to rank {dst}", dist.isend, t.contiguous(), dst,
                         group=self.world_group)

    def wait(self, work, what: str) -> None:
        self._run(what, work.wait)

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self._run(f"receiving activations from rank {src}", dist.recv, t, src, group=self.world_group)
        return t

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self._run(f"broadcast from rank {src}", dist.broadcast, t, src, group=self.world_group)
        return t

    def agree(self, text: str) -> str:
        """Rank 0's `text` on every rank (the plan: every rank must apply the same one)."""
        box = [text]
        self._run("sharing rank 0's plan", dist.broadcast_object_list, box, src=0, group=self.world_group)
        return box[0]

    def reduce_stat(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """Elementwise max/min over the tp group (quantization statistics of a sharded weight)."""
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN
        self._run(f"all_reduce({op}) of quantization statistics", dist.all_reduce, t, op=reduce_op,
                  group=self.tp_group)
        return t


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_parallel(tp: int, pp: int, timeout_s: float, device_type: str) -> ParallelContext:
    """Join (or start) the torchrun job and create this job's groups with its timeout."""
    if not dist.is_available():
        raise DistributedError("tp/pp > 1 needs torch.distributed, which this torch build lacks.")
    want = tp * pp
    timeout = datetime.timedelta(seconds=timeout_s)
    created = not dist.is_initialized()
    if created:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise DistributedError(
                f"tp={tp}, pp={pp} runs one process per shard ({want} in all) inside a torchrun job, but this "
                f"process was not started by torchrun. Launch it with: torchrun --nproc-per-node {want} "
                "your_script.py (see docs/parallel.md), or use tp=1, pp=1.")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(_backend(device_type), timeout=timeout)
    world = dist.get_world_size()
    if world != want:
        raise DistributedError(
            f"tp={tp} x pp={pp} needs {want} processes but this job has {world}. Launch with "
            f"torchrun --nproc-per-node {want} (or, over several machines, --nnodes N with N x "
            f"--nproc-per-node = {want}), or change tp/pp.")
    rank = dist.get_rank()
    stage_ranks = [list(range(s * tp, (s + 1) * tp)) for s in range(pp)]
    ctx = ParallelContext(tp=tp, pp=pp, rank=rank, timeout_s=timeout_s, stage_ranks=stage_ranks)
    # new_group is collective: every rank creates every group, in the same order.
    ctx.world_group = dist.new_group(list(range(world)), timeout=timeout)
    groups = [ctx.world_group]
    for ranks in stage_ranks:
        groups.append(dist.new_group(ranks, timeout=timeout))
        if rank in ranks:
            ctx.tp_group = groups[-1]
    atexit.register(_shutdown, groups, created)
    return ctx


def _shutdown(groups: list, created_default: bool) -> None:
    """Tear the groups down before the interpreter does: gloo's threads may otherwise abort
    the process at exit after a successful run."""
    if not dist.is_initialized():
        return
    for group in groups:
        try:
            dist.destroy_process_group(group)
        except (RuntimeError, ValueError):
            pass
    if created_default:
        dist.destroy_process_group()
