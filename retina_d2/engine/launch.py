"""``launch``: Detectron2's multi-process launcher that also runs on a machine without CUDA.

Detectron2 0.6's workers assert CUDA, join an NCCL process group and pin a GPU each. Without CUDA
the same processes here join a gloo group on the CPU instead (``--num-gpus N`` then means N
processes), so distributed training and evaluation can be run, and tested, anywhere. With CUDA,
or with a single process, this is Detectron2's ``launch`` unchanged.
"""
import logging
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.engine.launch import launch as d2_launch
from detectron2.utils import comm

__all__ = ["launch"]

logger = logging.getLogger(__name__)


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of ``num_machines``
    machines (Detectron2's ``launch``; same arguments), on the CPU with gloo when there is no
    CUDA."""
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1 or torch.cuda.is_available():
        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url 'auto' works on one machine only; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    logger.warning("no CUDA: %d processes per machine on the CPU (gloo)", num_gpus_per_machine)
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _cpu_worker(
    local_rank, main_func, world_size, procs_per_machine, machine_rank, dist_url, args, timeout
):
    """Detectron2's ``_distributed_worker`` on the CPU: gloo instead of NCCL, no GPU to pin."""
    from .. import compat

    compat.patch_cpu_ddp()
    if "OMP_NUM_THREADS" not in os.environ:
        # N processes with a thread per core each would fight over the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs_per_machine))
    global_rank = machine_rank * procs_per_machine + local_rank
    dist.init_process_group(
        backend="gloo",
        init_method=dist_url,
        world_size=world_size,
        rank=global_rank,
        timeout=timeout,
    )
    # Detectron2's per-machine group (comm.get_local_rank and friends read it).
    for i in range(world_size // procs_per_machine):
        group = dist.new_group(list(range(i * procs_per_machine, (i + 1) * procs_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)
