"""Whole values of parameters that DeepSpeed ZeRO-3 partitions across processes.

Under ZeRO-3 each process keeps only a shard of every partitioned parameter (`p.data` is empty between forward
passes), so code that reads or writes weights outside a forward pass, such as the soft update of a snapshot, must
gather them first. Gathering is a collective: every process must enter the same `full_parameters` blocks in the
same order. Without DeepSpeed, or for parameters it keeps whole, this is a no-op.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ZeRO-3 manages this parameter (it then carries DeepSpeed's `ds_id`)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def full_parameters(params: Iterable[torch.Tensor], modified: bool = False) -> Iterator[None]:
    """Inside the block, `params` hold their full values on every process.

    With `modified=True`, writes made inside the block are kept: every process must then write the same values,
    because rank 0's are the ones partitioned back on exit. Otherwise writes are discarded with the gathered copy."""
    managed = [p for p in params if is_partitioned(p)]
    if not managed:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(managed, modifier_rank=0 if modified else None):
        yield
