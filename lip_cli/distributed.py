"""One pass on several processes (torchrun): each rank streams its share of the rows, the LAP sums
and accuracy counts are added with all_reduce, rank 0 alone writes and reports.

Under `torchrun` the environment names the rank and the world size; without it everything here
is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lip_cli.errors import LipError

if TYPE_CHECKING:
    import torch
    from torch import Tensor


def is_leader() -> bool:
    """Whether this process reports: rank 0 of a torchrun job, or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def rows(self, total: int) -> tuple[int, int]:
        """This rank's contiguous share of `total` rows."""
        return total * self.rank // self.world_size, total * (self.rank + 1) // self.world_size

    def check(self, error: LipError | None) -> None:
        """A collective: if any rank failed, every rank fails with the first failing rank's message."""
        if not self.active:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        messages: list[str | None] = [None] * self.world_size
        dist.all_gather_object(messages, None if error is None else str(error))
        if error is not None:
            raise error
        failed = next((message for message in messages if message is not None), None)
        if failed is not None:
            raise LipError(failed)

    def sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over the ranks (in place where the backend allows), returned."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(values)
        return values

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def from_environment(device: torch.device) -> Group:
    """The torchrun group this process belongs to (gloo on CPU, nccl on CUDA), or a lone process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Group()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except (RuntimeError, ValueError) as error:
            raise LipError(f"torch.distributed could not start ({error})") from error
    return Group(dist.get_rank(), dist.get_world_size())
