"""torchrun support: one process per device, DistributedDataParallel, collectives for metrics.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a single process and every
collective here is a no-op. CUDA processes use NCCL, CPU processes gloo (the tests run 2 CPU processes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised: bool = False

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            dist.init_process_group(backend)
        return cls(rank, world, local, True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str = "auto") -> torch.device:
        if requested == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", self.local_rank)
            return torch.device("cpu")
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise ValueError(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA device here; "
                                 "use --device cpu (or auto)")
            if dev.index is None:
                dev = torch.device("cuda", self.local_rank)
        return dev

    def barrier(self) -> None:
        if self.initialised:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on any (a signal may reach only some of them)."""
        if not self.initialised:
            return flag
        t = torch.tensor([int(flag)], device=self._collective_device())
        dist.all_reduce(t)
        return bool(t.item())

    def sum_dict(self, d: dict, keys) -> dict:
        out = dict(d)
        t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        for k, v in zip(keys, t.tolist()):
            out[k] = type(d[k])(v) if isinstance(d[k], int) else v
        return out

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.initialised and dist.is_initialized():
            dist.destroy_process_group()
