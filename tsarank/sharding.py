"""Scoring on several processes: who scores which chunk, and how the processes agree.

``tsarank rerank`` under ``torchrun --nproc_per_node N`` (or the ``deepspeed`` launcher, or several nodes), or
with ``--devices cuda:0,cuda:1`` (one process per device, started here): every process reads and checks the same
inputs, plans the same chunks of whole queries, and scores the chunks :func:`assign_chunks` gives it. A chunk is
scored with the same batches whichever process scores it, so the merged run is byte-identical to one process's.

Processes coordinate over a gloo process group (CPU tensors: no GPU collective is involved, whatever the device
of the model); one small all-reduce at each point where a process could have failed, so that no process waits
forever for one that stopped.
"""

from __future__ import annotations

import heapq
import os
import socket
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["ScoringGroup", "assign_chunks", "chunk_cost", "free_port"]


def chunk_cost(query: str, docs: Sequence[str], doc_chars: int) -> int:
    """Estimated tokens of scoring one query's documents: characters / 4, each document capped at ``doc_chars``
    (what its token budget lets through). The split only needs to be proportional to the work, and it must be
    known before any tokenizer is loaded, identically on every process."""
    q = len(query)
    return sum(min(len(d), doc_chars) + q for d in docs) // 4 + 1


def assign_chunks(costs: Sequence[int], world: int) -> list[list[int]]:
    """Chunks for each of ``world`` processes, balanced by cost (longest first, each to the least loaded process;
    ties by process index). Deterministic: every process computes the same answer.

    Args:
        costs: Cost of each chunk, in chunk order.
        world: Number of processes.

    Returns:
        ``shares[r]``: the chunk indices process ``r`` scores, in chunk order.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    heap = [(0, r) for r in range(world)]
    shares: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        shares[r].append(i)
        heapq.heappush(heap, (load + costs[i], r))
    return [sorted(s) for s in shares]


def free_port() -> int:
    """A TCP port free on this host now (for the rendezvous of processes started here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ScoringGroup:
    """This process's place among the scoring processes.

    Attributes:
        rank: Global rank (0 writes the merged output).
        world: Number of processes.
        local_rank: Rank on this node (picks the GPU).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "ScoringGroup":
        """Join the process group a launcher described (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...); one process
        when there is none."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        return cls(rank, world, local_rank)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_ok(self, ok: bool) -> bool:
        """True when ``ok`` holds on every process (a collective: every process must call it at the same point)."""
        return all(self.oks(ok))

    def oks(self, ok: bool) -> list[bool]:
        """``ok`` of every process, by rank (a collective)."""
        if not self.distributed:
            return [ok]
        flags = torch.zeros(self.world, dtype=torch.int32)
        flags[self.rank] = 1 if ok else 0
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.SUM)
        return [bool(f) for f in flags.tolist()]

    def max(self, value: float) -> float:
        """The largest ``value`` over the processes."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def device(self, asked: str | None) -> str | None:
        """The device of this process: ``cuda:LOCAL_RANK`` when several processes share a node's GPUs and the user
        asked for ``cuda`` or nothing; an explicit ``cuda:N`` or ``cpu`` as given."""
        if not self.distributed:
            return asked
        if asked in (None, "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return asked
