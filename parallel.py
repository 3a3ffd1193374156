"""Data parallelism, the same for inference as for training: `NUM_GPUS=N` makes a step relaunch itself through
`accelerate launch` as N processes (one per GPU; on a machine without GPUs, N gloo processes on the CPU).

Training (qlora_finetune.py, every *_train.sh) is then data-parallel through the trainer.  A generating or scoring
step splits its work into the whole batches a single process would form, takes every N-th of them, and gathers the
answers from all processes, so its outputs are those of a single run, byte for byte; only the main process writes
files and calls the paid teacher (the others wait for its answers in the teacher's cache file, outside the process
group: see teacher.Teacher._await).  Several machines: give `accelerate launch` its usual config (accelerate config,
then ACCELERATE_CONFIG_FILE=...); the steps need no change.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return rank() == 0


def relaunch():
    """Under NUM_GPUS=N > 1, replace this process by `accelerate launch` running the same command as N processes."""
    n = int(os.environ.get("NUM_GPUS") or 1)
    if n <= 1 or "WORLD_SIZE" in os.environ:  # not asked, or already one of the launched processes
        return
    print(f"NUM_GPUS={n}: running {os.path.basename(sys.argv[0])} as {n} data-parallel processes", flush=True)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               os.path.abspath(sys.argv[0]), *sys.argv[1:]]
    os.execv(sys.executable, command)


def _state():
    """The process group, joined once: NCCL across GPUs, gloo on a machine without (where accelerate must be told).
    PROCESS_GROUP_TIMEOUT (seconds) is how long a collective waits for the slowest process (default: torch's, 30
    minutes for gloo, 10 for NCCL)."""
    import torch
    from accelerate import PartialState

    timeout = os.environ.get("PROCESS_GROUP_TIMEOUT")
    kwargs = {"timeout": timedelta(seconds=float(timeout))} if timeout else {}
    return PartialState(cpu=not torch.cuda.is_available(), **kwargs)


def gather(items: list) -> list:
    """The concatenation, in process order, of every process's `items`, on every process."""
    if world_size() == 1:
        return items
    from accelerate.utils import gather_object

    _state()
    return gather_object(items)


def broadcast(obj):
    """The main process's `obj`, on every process."""
    if world_size() == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    _state()
    return broadcast_object_list([obj])[0]


def barrier():
    """Wait until every process is here."""
    if world_size() > 1:
        _state().wait_for_everyone()
