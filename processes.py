"""Processes: this process's device and torchrun's process groups, errors that stop every process
together, what a run undoes when it ends, FSDP2/HSDP sharding, and train.sh's wrapper around
torchrun (python processes.py --nproc_per_node=N ...: torchrun without its traceback when a stage
fails)."""

import atexit
import datetime
import os
import signal
import sys
import traceback

import torch
import torch.distributed as dist

import errors


def per_node(world=1):
    """The processes of this node: torchrun's LOCAL_WORLD_SIZE; without torchrun, `world` (one
    process, or the processes a plan is made for)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


_waits = []  # the process group of the long waits (init_distributed)


def start(cpu=False):
    """This process and its device, DDP as nanoGPT's: torchrun sets RANK; one process a device.
    (ddp, cuda, device, rank, world)"""
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available() and not cpu
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ddp:
        init_distributed(cuda)
    rank = dist.get_rank() if ddp else 0
    world = dist.get_world_size() if ddp else 1
    return ddp, cuda, device, rank, world


def init_distributed(cuda):
    """torchrun's process group (NCCL on CUDA, gloo on CPU) with its default timeout (NCCL: 10
    minutes), so that a dead peer on another node ends a collective in minutes, not hours; and a
    gloo group for the waits that may be long (every process checking its share of the data, rank 0
    writing a 4B model's checkpoint: ~47 GB), with a timeout of 2 hours."""
    dist.init_process_group("nccl" if cuda else "gloo")
    long = datetime.timedelta(hours=2)
    _waits.append(dist.new_group(backend="gloo", timeout=long))


def run_on_every_process(fn, *args):
    """fn(*args) on every process, with no collective inside. A UserError on any process stops them
    all together: each raises every distinct message (processes check parts of the data), in rank
    order, as an agreed error."""
    result = message = None
    try:
        result = fn(*args)
    except errors.UserError as e:
        message = str(e)
    if not dist.is_initialized():
        if message is not None:
            raise errors.agreed_error(message)
        return result
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message, group=_waits[-1])
    failed = list(dict.fromkeys(m for m in messages if m is not None))  # distinct, in rank order
    if failed:
        raise errors.agreed_error("\n".join(failed))
    return result


def gather_lists(items):
    """Every process's list, joined in rank order (on the long waits' group)."""
    if not dist.is_initialized():
        return list(items)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, list(items), group=_waits[-1])
    return [item for part in every for item in part]


def print_notes(master):
    """errors.note's notes of every process, each once, by rank 0, with every process's ids."""
    merged = {}
    for text, ids in gather_lists(errors.take_notes()):
        merged.setdefault(text, []).extend(ids)
    for text, ids in merged.items() if master else ():
        if ids:
            text = text.replace("{n}", str(len(ids))).replace("{ids}", ", ".join(ids[:5]))
        print(text)


def raise_messages(messages):
    """For run_on_every_process: this process's messages, as one UserError."""
    if messages:
        raise errors.UserError("\n".join(messages))


def on_rank0(master, what, fn, *args):
    """fn(*args) on rank 0 while the others wait (run_on_every_process): an error there stops
    every process with its line (and rank 0's traceback), instead of leaving them at a barrier."""

    def attempt():
        if not master:
            return
        try:
            fn(*args)
        except Exception as e:
            if isinstance(e, errors.UserError) or not dist.is_initialized():
                raise
            traceback.print_exc()
            raise errors.UserError(f"rank 0: {type(e).__name__}: {e}, while {what}") from e

    run_on_every_process(attempt)


_cleanups = []  # what a run undoes when it ends (main's finally, or at exit)


def cleanup():
    while _cleanups:
        _cleanups.pop()()


atexit.register(cleanup)


def stop(error, out):
    """Exit 1 with `error: message`. An agreed error is printed by rank 0 alone, and every process
    waits for that before it exits (torchrun stops every process as soon as one exits). Any other is
    this process's own: it says so with its rank, and torchrun stops the rest. An OSError is one
    only when the disk of `out` is full; any other is raised again, with its traceback."""
    if isinstance(error, OSError):
        if not errors.full_disk(error, out):
            raise error
        error = errors.UserError(
            f"no space left on the device of {out} ({error.filename}); the last complete "
            f"checkpoint is kept: make space, then run the same command"
        )
    if not dist.is_initialized():
        raise SystemExit(f"error: {error}") from None
    rank = dist.get_rank()
    if getattr(error, "agreed", False):
        if rank == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        dist.barrier(group=_waits[-1])
        dist.destroy_process_group()
        raise SystemExit(1) from None
    raise SystemExit(f"error (rank {rank}): {error}") from None


def shard(student, model, bf16, teacher=None):
    """FSDP2 instead of DDP: parameters, gradients and AdamW state split over the processes. Each
    decoder layer is a group; the root group (embeddings, final norm, head, projector) is whole
    through the root's forward, where fused_loss reads the head. The frozen vision tower, shared
    with the teacher and run before the student, stays whole on every process. The frozen teacher's
    LLM is sharded on the same mesh: its layers gathered one at a time in its forward (no_grad) and
    freed after, its embeddings (read before the LLM runs) and head (fused_loss reads it) whole. On
    several nodes: sharded within a node, replicated across nodes (HSDP, a 2-D mesh), so that a
    step's all-gathers stay on the node's own links."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 (on CUDA): parameters gathered in bf16, gradients reduced in float32
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    on_node = per_node(dist.get_world_size())
    nodes = dist.get_world_size() // on_node
    device = model.lm_head.weight.device.type
    mesh = init_device_mesh(device, (nodes, on_node), mesh_dim_names=("replicate", "shard"))
    mesh = mesh if nodes > 1 else mesh["shard"]
    if dist.get_rank() == 0:
        also = ", the teacher's layers too" if teacher is not None else ""
        print(f"FSDP2: sharded over {on_node} processes, replicated over {nodes} node(s){also}")
    if teacher is not None:  # gathered as stored (bf16 on CUDA); the LLM the root of its layers
        llm = teacher.model.language_model
        for layer in llm.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(llm, mesh=mesh, ignored_params=set(llm.embed_tokens.parameters()))
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    tower = set(model.model.vision_tower.parameters())
    return fully_shard(student, mesh=mesh, mp_policy=policy, ignored_params=tower)


def launch(argv):
    """torchrun (the same flags) without its traceback when a stage fails: the stage's own `error:
    ...` line (rank 0's) stays the last it printed. Exit status: that of the first process that
    failed (128 + N for signal N), with one line where that process printed none (a crash)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.root.manager.loggerDict):  # its lines of every process it stops
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code != 1:  # 1: an error the stage printed itself
            why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            print(f"error: process {rank} of the stage ended with {why}", file=sys.stderr)
        sys.exit(128 - code if code < 0 else code)
    except SignalException as e:  # torchrun stopped by a signal, its processes with it
        sys.exit(128 + e.sigval)


if __name__ == "__main__":
    launch(sys.argv[1:])
