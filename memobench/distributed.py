"""Sharding a run over processes and machines (CONVENTIONS §9).

Two ways to split one run, which compose:

* ``--shard i/n`` — no process group, nothing shared but the cache directory: SLURM job arrays, several machines
  on a shared file system, or one machine running shards one after another. Shard ``i`` generates its share and
  writes no result; ``memobench aggregate`` (the run's options, without ``--shard``) scores the cache once every
  shard has finished.
* ``accelerate launch -m memobench run …`` / ``torchrun -m memobench run …`` — rank and world size from the
  environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); a torch.distributed
  process group (gloo on CPU, NCCL on CUDA) is used for barriers only: no tensor or image crosses the network.
  Rank 0 scores the cache after the last barrier and writes the result.

With both, ``--shard i/n`` over ``W`` processes is the part ``i·W + rank`` of ``n·W``.

What is split is fixed before anything is generated and never depends on what is cached (so that every process
computes the same assignment even while the others are writing): the run's jobs are grouped into *units* — all
seeds of one prompt for one role (the attack of a target prompt and its images belong to one unit, so a prompt is
attacked by exactly one process) — and the units of each role, sorted by a hash of their sample keys, are dealt
round-robin (:func:`assign_units`). A
sample key that occurs in several units (the same prompt and seed in two roles) belongs to the first. Each process
generates the pending keys of its units, in the runner's fixed batches over all of a prompt's seeds, so images are
bit-identical whatever the number of shards, and the union of all shards is exactly the unsharded run.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass
from typing import Iterable

from .cache import key_of
from .config import BadInput


class DistributedError(Exception):
    """A collective failed (typically: another rank died). Completed samples are cached; re-run to resume."""


@dataclass(frozen=True)
class Shard:
    """This process's part of a run: ``index`` of ``count`` (``count`` = 1: the whole run)."""

    index: int = 0
    count: int = 1
    rank: int = 0  # rank in the process group (0 without one)
    world_size: int = 1  # size of the process group (1 without one)
    local_rank: int = 0  # GPU index on this machine under torchrun / accelerate launch
    array: tuple[int, int] | None = None  # the --shard i/n it was built from, if any

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def group(self) -> bool:
        """Whether this process is one of a torch.distributed process group (barriers available)."""
        return self.world_size > 1

    @property
    def writes_result(self) -> bool:
        """Rank 0 of a process group that covers the whole run scores and writes the result."""
        return self.array is None and self.rank == 0

    def describe(self) -> str:
        parts = []
        if self.array is not None:
            parts.append(f"--shard {self.array[0]}/{self.array[1]}")
        if self.group:
            parts.append(f"rank {self.rank}/{self.world_size}")
        return f"shard {self.index}/{self.count} ({', '.join(parts) or 'single process'})"

    def record(self) -> dict:
        return {"index": self.index, "count": self.count, "rank": self.rank, "world_size": self.world_size,
                "local_rank": self.local_rank, "array": list(self.array) if self.array else None}


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"i/n"`` with 0 ≤ i < n → ``(i, n)``; ``None``/``""`` → ``None``."""
    if spec is None or spec == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m:
        raise BadInput(f"--shard: cannot read {spec!r}; use INDEX/COUNT with 0 ≤ INDEX < COUNT, e.g. 0/4")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise BadInput(f"--shard: {spec!r} is out of range; use INDEX/COUNT with 0 ≤ INDEX < COUNT, "
                       f"e.g. 0/{max(n, 2)}")
    return i, n


def environment_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) set by ``torchrun`` / ``accelerate launch`` (0, 1, 0 when absent)."""
    def get(names: Iterable[str], default: int) -> int:
        for n in names:
            v = os.environ.get(n)
            if v not in (None, ""):
                try:
                    return int(v)
                except ValueError:
                    raise BadInput(f"{n}: expected an integer, got {v!r} (set by torchrun / accelerate launch)") \
                        from None
        return default

    world = get(("WORLD_SIZE",), 1)
    rank = get(("RANK",), 0)
    local = get(("LOCAL_RANK",), rank)
    if world < 1 or not 0 <= rank < world:
        raise BadInput(f"RANK={rank} / WORLD_SIZE={world}: need 0 ≤ RANK < WORLD_SIZE (set by torchrun / accelerate "
                       "launch)")
    return rank, world, local


def make_shard(array: tuple[int, int] | None = None, rank: int = 0, world_size: int = 1,
               local_rank: int = 0) -> Shard:
    i, n = array if array else (0, 1)
    return Shard(index=i * world_size + rank, count=n * world_size, rank=rank, world_size=world_size,
                 local_rank=local_rank, array=array)


def shard_from_environment(spec: str | None = None) -> Shard:
    """This process's shard from ``--shard i/n`` (or ``None``) and the launcher's RANK / WORLD_SIZE."""
    rank, world, local = environment_rank()
    return make_shard(parse_shard(spec), rank, world, local)


class ProcessGroup:
    """A torch.distributed process group used for barriers only (no data is exchanged)."""

    def __init__(self, shard: Shard, device: str):
        import torch.distributed as dist

        self.shard = shard
        self._dist = dist
        self._owned = False
        if not shard.group:
            return
        if not dist.is_available():
            raise BadInput("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process per "
                           "shard with --shard i/n instead")
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing and not dist.is_initialized():
            raise BadInput(f"WORLD_SIZE={shard.world_size} but {', '.join(missing)} is not set; start the ranks "
                           "with `accelerate launch -m memobench run …` or `torchrun --nproc-per-node N -m memobench "
                           "run …`")
        if not dist.is_initialized():
            backend = "nccl" if str(device).startswith("cuda") and dist.is_nccl_available() else "gloo"
            # barriers wait for the slowest rank's whole generation phase: the default 30 min would kill long runs
            timeout = _dt.timedelta(seconds=float(os.environ.get("MEMOBENCH_DIST_TIMEOUT_S", 7 * 24 * 3600)))
            kw = {}
            if backend == "nccl":
                import torch

                kw["device_id"] = torch.device(device)
            try:
                dist.init_process_group(backend, rank=shard.rank, world_size=shard.world_size, timeout=timeout,
                                        **kw)
            except TypeError:  # torch without device_id
                dist.init_process_group(backend, rank=shard.rank, world_size=shard.world_size, timeout=timeout)
            self._owned = True

    def barrier(self, what: str) -> None:
        if not self.shard.group:
            return
        try:
            self._dist.barrier()
        except Exception as e:  # gloo: "Connection closed by peer"; NCCL: watchdog / DistBackendError
            raise DistributedError(f"rank {self.shard.rank} of {self.shard.world_size}: barrier '{what}' failed "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); another rank probably "
                                   "died; completed samples are cached, re-run the same command to resume") from None

    def close(self) -> None:
        if self._owned and self._dist.is_initialized():
            try:
                self._dist.destroy_process_group()
            except Exception:
                pass
            self._owned = False


def assign_units(units: list[list[str]], count: int, groups: list[str] | None = None) -> list[int]:
    """Shard index of each unit (a list of sample keys).

    Units are taken group by group (``groups[k]`` labels unit ``k``, e.g. its role; groups in sorted order),
    sorted within a group by the hash of their keys and dealt round-robin with one running counter, so every group
    (the expensive attacked targets as much as the cheap utility prompts) is split evenly, ±1 unit. The result
    depends only on the set of units (never on their listing order or on what is cached), so every process of a
    run computes the same assignment."""
    groups = groups if groups is not None else [""] * len(units)
    ids = [key_of(sorted(u)) for u in units]
    order = sorted(range(len(units)), key=lambda k: (groups[k], ids[k]))
    out = [0] * len(units)
    for pos, k in enumerate(order):
        out[k] = pos % count
    return out
