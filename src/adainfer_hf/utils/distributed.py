"""The processes of one run under `accelerate launch` (or torchrun): which one this is, its share of the work, and
moving results between them.

Everything reads the default `torch.distributed` process group; with none initialized (or one process) every
helper is the one-process identity, so the same code runs unchanged in both. [`launch_state`] initializes the group
the way the command line does (accelerate's `PartialState`, over gloo when there is no accelerator).

Work is shared by *batch*: [`shard_results`] hands batch `i` of a list to process `i % N` and returns the results
in batch order on the main process. A batch runs with exactly the rows (and padding) it has in a one-process run,
so the merged results are the one-process results, row for row.

The object collectives pickle their payloads (our own objects, between the processes of one job); with NCCL they
travel through the current GPU (`torch.cuda.current_device()`, which `PartialState` sets per process).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState
from tqdm.auto import tqdm

__all__ = ["all_gather", "barrier", "broadcast_from_main", "gather_on_main", "is_distributed", "is_main_process",
           "launch_state", "on_main", "num_processes", "place_replica", "process_index", "shard_results"]


def is_distributed() -> bool:
    """Whether a default process group with more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_index() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def num_processes() -> int:
    """The processes in the default group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Whether this is rank 0 (always, without a process group): the process that merges, trains and writes."""
    return process_index() == 0


def launch_state() -> PartialState:
    """accelerate's `PartialState` for the processes `accelerate launch` started, over gloo on the CPU when there is
    no accelerator (accelerate picks gloo only when told the run is on the CPU; `--multi_gpu` starts the processes
    with torchrun either way). One process: a state of one process, no group."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=use_cpu or torch.accelerator.current_accelerator() is None)


def place_replica(model, state: PartialState):
    """`model` on this process's device (`state.device`) when several processes share the work: one replica per
    process. A model placed with `device_map` (it has an `hf_device_map`) stays where it is: that process owns the
    devices its layers are on. One process, or processes on the CPU: `model` stays where it was loaded."""
    # On the CPU there is nothing to move (state.device is "cpu:0", and moving there changes no memory but does
    # change some kernels' summation order: the tables would differ from the one-process run in the last bit).
    if state.num_processes > 1 and state.device.type != "cpu" and not getattr(model, "hf_device_map", None):
        model.to(state.device)
    return model


def barrier() -> None:
    """Waits for every process (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def gather_on_main(obj: Any) -> list | None:
    """Every process's `obj`, in rank order, on the main process; None on the others (`[obj]` without a group)."""
    if not is_distributed():
        return [obj]
    out = [None] * num_processes() if is_main_process() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: Any) -> list:
    """Every process's `obj`, in rank order, on every process (`[obj]` without a group)."""
    if not is_distributed():
        return [obj]
    out = [None] * num_processes()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """The main process's `obj` on every process (`obj` itself without a group; the others' `obj` is ignored)."""
    if not is_distributed():
        return obj
    box = [obj if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(run: Callable[[], Any]) -> Any:
    """`run()` on the main process only, its result on every process (`run()` itself without a group).

    An exception on the main process is raised there and, as a `RuntimeError` naming it, on the others (which
    would otherwise wait for a result that never comes)."""
    if not is_distributed():
        return run()
    result, error = None, None
    if is_main_process():
        try:
            result = run()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others are told
            error = exc
    sent = broadcast_from_main((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if sent[1] is not None:
        raise RuntimeError(f"the main process failed ({sent[1]}); this process stops too.")
    return sent[0]


def shard_results(run: Callable[[Any], Any], batches: Sequence, *, distributed: bool, progress: bool = False,
                  desc: str = "", everywhere: bool = False) -> Iterator[tuple[int, Any]]:
    """`(i, run(batches[i]))` for every batch, in batch order.

    Args:
        run (`Callable`): computes one batch's result (picklable when `distributed`).
        batches (`Sequence`): the batches, the same on every process.
        distributed (`bool`): share the batches over the processes of the default group (batch `i` on process
            `i % N`) and gather the results; every process must then call this with the same batches. Without a
            group (or False) this process runs every batch, one by one as they are consumed.
        progress (`bool`, *optional*): a tqdm bar over this process's batches, on the main process only.
        desc (`str`, *optional*): the bar's label.
        everywhere (`bool`, *optional*): give every process all the results (all-gather); by default only the
            main process gets them and the others get none (gather to rank 0).
    """
    shared = distributed and is_distributed()
    rank, size = (process_index(), num_processes()) if shared else (0, 1)
    mine = range(rank, len(batches), size)
    bar = tqdm(mine, desc=desc, unit="batch", disable=not progress or rank != 0)
    if not shared:  # lazily: the caller stores each result before the next batch runs
        yield from ((i, run(batches[i])) for i in bar)
        return
    local = [(i, run(batches[i])) for i in bar]
    parts = all_gather(local) if everywhere else gather_on_main(local)
    if parts is None:
        return
    yield from sorted((item for part in parts for item in part), key=lambda item: item[0])
