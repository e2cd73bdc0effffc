"""The life of --out: checkpoints (written beside and renamed into place, complete.json last),
how a run resumes or is skipped, the stage's published model and done.json, the log, and the lock
that keeps one run an --out."""

import json
import os
import shutil
import socket

import torch
from tqdm import tqdm

import errors
import processes

# What --resume may change: everything else must be what the checkpoint was written with. A
# checkpoint holds the whole state (AdamW's by parameter name), so DDP and FSDP2 continue each
# other's; --data is compared by what the file holds (data_sha256), not where it is.
MAY_CHANGE = {"resume", "max_steps", "save_every", "workers", "batch_size", "cpu", "plan"}
MAY_CHANGE |= {"ignore_plan", "grad_checkpointing", "images", "out", "auto_resume", "fsdp"}
MAY_CHANGE |= {"plan_gpus", "plan_gib", "attn_implementation", "data"}
MAY_CHANGE |= {"eval_data", "eval_images", "eval_every", "report_to"}  # what training never reads


def check_resume(a, saved, digest, what=None):
    """--resume with the flags the checkpoint (or the finished stage) was written with (but
    MAY_CHANGE), on the same data."""
    what = what or f"--resume: the checkpoint in {a.out}"
    if saved.get("data_sha256", digest) != digest:
        then = saved["data"] if isinstance(saved["data"], str) else " ".join(saved["data"])
        raise errors.UserError(
            f"{what} was written on other data: --data {' '.join(a.data)} does not hold the "
            f"samples it trained on (then at {then}); continue on those, or give a new --out"
        )
    differ = [k for k, v in vars(a).items() if k not in MAY_CHANGE and k in saved and saved[k] != v]
    if differ:
        was = ", ".join(f"--{k} {saved[k]} (now {getattr(a, k)})" for k in differ)
        raise errors.UserError(
            f"{what} was written with {was}; continue with the same flags (these may change: "
            f"{', '.join('--' + k for k in sorted(MAY_CHANGE))}), or give a new --out"
        )


# A save writes checkpoint.tmp/, then renames it checkpoint/ (the one before: checkpoint.old/)
CHECKPOINTS = ("checkpoint", "checkpoint.tmp", "checkpoint.old")
COMPLETE = "complete.json"  # written last: {"step": n, "files": {name: bytes}}
DONE = "done.json"  # the stage's output is published (publish writes it last): {"step", "args",
# "finished": the whole schedule ran, its checkpoint is then removed}


def read_marker(path, keys):
    """A marker file's JSON object with these keys, or one line naming the file: a stop (or a full
    disk) while it was written, or a copy cut short."""
    try:
        with open(path) as f:
            value = json.load(f)
    except ValueError as e:
        value = e
    if isinstance(value, dict) and set(keys) <= set(value):
        return value
    found = f"not JSON: {value}" if isinstance(value, ValueError) else f"holds {str(value)[:60]}"
    raise errors.UserError(
        f"{path}: cut short or damaged ({found}); expected keys {', '.join(keys)}"
    )


def checkpoint_problem(path):
    """None for a complete checkpoint directory; else what is wrong with it."""
    marker = os.path.join(path, COMPLETE)
    if not os.path.isfile(marker):
        return "its save did not finish"
    try:
        files = read_marker(marker, ("step", "files"))["files"]
    except errors.UserError as e:
        return str(e)
    for name, size in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) != size:
            return f"{file} has {os.path.getsize(file)} bytes where the save wrote {size}"
    return None


def newest_checkpoint(out):
    """The newest complete checkpoint of out, among checkpoint/ and a crash's leftovers (None), and
    what is wrong with the others."""
    found, problems = [], []
    for name in CHECKPOINTS:
        path = os.path.join(out, name)
        problem = checkpoint_problem(path) if os.path.isdir(path) else None
        if problem:
            problems.append(f"{path}: {problem}")
        elif os.path.isdir(path):
            found.append((read_marker(os.path.join(path, COMPLETE), ("step",))["step"], path))
    return max(found)[1] if found else None, problems


def find_checkpoint(out):
    path, problems = newest_checkpoint(out)
    if path:
        return path
    seen = "; ".join(problems) or "none was written"
    if not problems and os.path.isfile(os.path.join(out, DONE)):
        seen = f"the stage finished ({DONE}) and its checkpoint was removed"
    raise errors.UserError(
        f"--resume: no complete checkpoint in {out} ({seen}); start again on a new --out"
    )


def how_to_start(a, master, digest):
    """How the run begins in --out: "resume", "start" or "skip" (the one place that decides). As
    --resume says; with --auto_resume (train.sh) what --out holds decides. The stage finished
    there with these flags: skip it. A complete checkpoint: resume it (a damaged done.json:
    published again). Nothing: start (dropping what a crash before the first checkpoint left).
    Another setting than the one it was started with: refused."""
    if not a.auto_resume or a.plan or a.plan_gpus:
        return "resume" if a.resume else "start"
    path = os.path.join(a.out, DONE)
    resumable = newest_checkpoint(a.out)[0] is not None
    if os.path.isfile(path):
        try:
            done = read_marker(path, ("step", "args"))
        except errors.UserError as e:
            if not resumable:
                raise errors.UserError(f"{e}: delete {a.out} to run the stage again") from None
            done = None  # published again from the checkpoint
        if done is not None:
            check_resume(a, done["args"], digest, f"{path}: the stage finished in {a.out}")
        if done is not None and done["args"].get("max_steps") == a.max_steps:
            if master:
                print(f"stage {a.stage}: finished in {a.out} (step {done['step']}): skipped")
            for name in CHECKPOINTS if master and done.get("finished") else ():
                shutil.rmtree(os.path.join(a.out, name), ignore_errors=True)  # a stop left it
            return "skip"
        if not resumable:
            raise errors.UserError(
                f"{path}: the stage finished at step {done['step']} and its checkpoint was "
                f"removed, so it cannot go on to --max_steps {a.max_steps}: give a new --out"
            )
    return "resume" if resumable else "start"


def claim_out(a, master, resume):
    """--out belongs to this run: two runs do not write at once (a lock: host and pid, removed at
    exit), and a new run does not write over another's model or checkpoint. A log or a torn
    checkpoint of a run that stopped before its first checkpoint holds nothing: started again."""
    if master:
        path = os.path.join(a.out, "run.lock")
        me = f"{socket.gethostname()} {os.getpid()}"
        try:
            os.makedirs(a.out, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, pid = (open(path).read().split() + ["", "0"])[:2]
            if host != socket.gethostname() or pid_alive(int(pid)):
                raise errors.UserError(
                    f"--out {a.out} is in use by process {pid} on {host} ({path}): wait for that "
                    f"run, or give another --out (if that process is gone, delete {path})"
                ) from None
            os.remove(path)  # left by a run that died on this host: taken over
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except OSError as e:  # read-only, not a directory, ...
            raise errors.UserError(
                f"--out {a.out}: cannot be written ({type(e).__name__}: {e.strerror}); give an "
                f"--out this process can write"
            ) from None
        os.write(fd, me.encode())
        os.close(fd)
        processes._cleanups.append(lambda: release_out(path, me))
    names = ("config.json", "log.jsonl", *CHECKPOINTS)
    held = [n for n in names if os.path.exists(os.path.join(a.out, n))]
    newest, problems = newest_checkpoint(a.out)
    if ("config.json" in held or newest) and not resume:
        damaged = "".join(f"; {p}" for p in problems)
        raise errors.UserError(
            f"--out {a.out} holds another run ({', '.join(held)}{damaged}): continue it with "
            f"--resume, or give a new --out (or delete that one)"
        )


def pid_alive(pid):
    if pid == os.getpid():  # this process's own, left by an earlier run in it (the tests)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_out(path, me):
    if os.path.isfile(path) and open(path).read() == me:
        os.remove(path)


def read_train_state(path):
    """The step, counts, AdamW state and flags of a checkpoint, as tensors and plain values only: a
    pickled object in a file someone shared could run code here, so weights_only refuses it."""
    try:
        # to the CPU: saved from cuda:0, it would land on cuda:0 on every rank; the optimizer's
        # load_state_dict moves each tensor beside its parameter. Mapped, not read: the AdamW state
        # of a 4B model is ~32 GB, and 8 processes share the file's pages
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as e:
        raise errors.UserError(
            f"--resume: {path} holds more than tensors and plain values, so it is not loaded "
            f"({type(e).__name__}); resume only from checkpoints this program wrote"
        ) from None


def save_checkpoint_files(model, processor, out, state_dict=None):
    # FSDP: the gathered state dict; a weight held in bf16 saved as the float32 it equals
    held = [n for n, p in model.named_parameters() if getattr(p, "held_in_bf16", False)]
    if held:
        state_dict = dict(model.state_dict() if state_dict is None else state_dict)
        state_dict.update({n: state_dict[n].float().cpu() for n in held if n in state_dict})
    model.save_pretrained(out, state_dict=state_dict)  # safetensors
    if held:  # save_pretrained names the dtype of the first parameter, a held one's here
        model.config.dtype = torch.float32
        model.config.save_pretrained(out)
    processor.save_pretrained(out)


def save_checkpoint(model, processor, state, out, state_dict=None):
    """out/checkpoint/: model + processor (stock from_pretrained loads it) + train_state.pt for
    --resume, and complete.json last (each file's size). Written beside it and renamed into place:
    a crash while saving keeps the last one, and --resume takes the newest complete one."""
    final, tmp, old = (os.path.join(out, n) for n in CHECKPOINTS)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint_files(model, processor, tmp, state_dict)
        torch.save(state, os.path.join(tmp, "train_state.pt"))
        sizes = {n: os.path.getsize(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            json.dump(dict(step=state["step"], files=sizes), f)
    except Exception as e:  # OSError, torch.save's RuntimeError, SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        if not errors.full_disk(e, out):
            raise
        raise errors.UserError(
            f"no space left on the device of {out} while writing the checkpoint of step "
            f"{state['step']}; the last complete one is kept: make space, then --resume"
        ) from None
    shutil.rmtree(old, ignore_errors=True)  # a leftover of a crash: older than tmp
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def publish(out, args, step, finished):
    """The stage's output: the newest checkpoint's model and processor in out itself (hard links: no
    second copy on disk), then done.json, written last (--auto_resume skips a stage that has it).
    A stage that ran its whole schedule then drops its checkpoint: nobody reads its AdamW state
    (twice the weights) again. One stopped by --max_steps keeps it, to go on."""
    ckpt = newest_checkpoint(out)[0]  # checkpoint/, or a save's leftover the run resumed from
    for name in os.listdir(ckpt):
        if name not in ("train_state.pt", COMPLETE):  # those only --resume reads
            write_atomic(os.path.join(out, name), source=os.path.join(ckpt, name))
    done = dict(step=step, args=args, finished=finished)
    write_atomic(os.path.join(out, DONE), json.dumps(done))
    if finished:
        for name in CHECKPOINTS:
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def full_state(student, opt):
    """FSDP: the whole model's and optimizer's state dicts, gathered (every process takes part). A
    head tied to the embeddings is saved once, as save_pretrained saves it unsharded."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(student, options=full)
    weights = {k.removeprefix("llava."): v for k, v in model_state.items()}
    llava = student.llava
    if llava.lm_head.weight is llava.get_input_embeddings().weight:
        weights.pop("lm_head.weight", None)  # rank 0 holds the gathered state, the others none
    return weights, get_optimizer_state_dict(student, opt, options=full)


def save(out, state, model, processor, student, opt, names, fsdp, master):
    """out/checkpoint: the model and processor, and `state` (the step, the schedule, the flags)
    with AdamW's state by parameter name. Under FSDP every process gathers the full state; rank 0
    writes, the others wait: nobody runs ahead of a checkpoint being written."""
    full_weights, opt_state = full_state(student, opt) if fsdp else (None, None)
    if not fsdp:
        opt_state = rekeyed(opt.state_dict(), dict(enumerate(names)))
    state = dict(state, optimizer=opt_state)
    step = state["step"]
    what = f"writing the checkpoint of step {step} (the last complete one is kept: --resume)"
    processes.on_rank0(master, what, save_checkpoint, model, processor, state, out, full_weights)


def rekeyed(opt_state, key):
    """AdamW's state with each parameter's key k replaced by key[k] (position <-> name)."""
    state = {key.get(k, k): v for k, v in opt_state["state"].items()}
    groups = [
        dict(g, params=[key.get(k, k) for k in g["params"]]) for g in opt_state["param_groups"]
    ]
    return dict(state=state, param_groups=groups)


def load_optimizer(student, opt, state, fsdp, names):
    """AdamW's state as saved (by name) into this run's optimizer, DDP's (by position) or FSDP2's
    (by name, sharded as it loads)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(student, opt, state, options=options)
    else:
        opt.load_state_dict(rekeyed(state, {n: i for i, n in enumerate(names)}))


class Log:
    """Rank 0's record of a run: out/log.jsonl (open_log), a record a line; the progress bar over
    the run's steps (the loop's iterator: an error ends its line), with the records' last values;
    with --report_to tensorboard the records as TensorBoard scalars in out/tensorboard (train/...,
    eval/...), whose events after the step the run starts at are dropped as the log's lines are."""

    def __init__(self, out, start_step, end, stage, report_to=None):
        self.file = open_log(out, start_step)
        self.board = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            board = os.path.join(out, "tensorboard")
            self.board = SummaryWriter(board, purge_step=start_step + 1)
        self.bar = tqdm(range(start_step, end), initial=start_step, total=end, desc=stage)
        self.shown = {}  # the bar's values: the last of each, terms the stage computes

    def write(self, rec):
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        for key, value in rec.items() if self.board else ():
            tag = key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}"
            if key != "step":
                self.board.add_scalar(tag, value, rec["step"])
        if self.board:
            self.board.flush()
        hidden = ("step", "lr", "eval_samples")
        self.shown.update((k, f"{v:.3g}") for k, v in rec.items() if v and k not in hidden)
        self.bar.set_postfix(self.shown)

    def close(self):
        self.file.close()
        if self.board:
            self.board.close()


def open_log(out, start_step):
    """out/log.jsonl, appended to. The lines a crash logged after the step this run starts at are
    dropped (every line, for a run that starts at 0), so each step is in the log once, and so is a
    line that a crash cut short."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "log.jsonl")
    if os.path.exists(path):
        kept, torn = [], 0
        for line in open(path):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if step <= start_step:
                kept.append(line.rstrip("\n") + "\n")
        if torn:
            print(f"note: {path}: dropped {torn} line(s) cut short by a crash")
        write_atomic(path, "".join(kept))
    return open(path, "a")


def write_atomic(path, text=None, source=None):
    """path holding text, or the file source (a hard link: no second copy on disk; a copy on a
    filesystem without them), or path as it was: written beside it, then renamed over it, so that
    a stop or a full disk leaves the one or the other, never a torn file."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    if source is None:
        with open(tmp, "w") as f:
            f.write(text)
    else:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy(source, tmp)
    os.replace(tmp, path)
