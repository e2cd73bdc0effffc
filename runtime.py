"""What a run needs around the method, which a reader beside the paper can skip: flags, data and
checkpoints checked before anything heavy loads, errors that stop every process together, one run
an --out, checkpoints that a crash or a signal does not lose, the log, the memory plan."""

import argparse
import atexit
import datetime
import errno
import functools
import importlib.util
import json
import os
import resource
import shutil
import signal
import socket
import sys
import threading
import time
import traceback

import safetensors
import torch
import torch.distributed as dist
import transformers
from torch.utils.data.distributed import DistributedSampler

import data

# --------------------------------------------------------------------------------------------------
# Errors: a UserError is the user's to fix; the command line prints its message alone, exit 1.


def agreed_error(message):
    """A UserError that every process raises at the same point (it came from values they share)."""
    error = data.UserError(message)
    error.agreed = True
    return error


_waits = []  # the process group of the long waits (init_distributed)


def init_distributed(cuda):
    """torchrun's process group (NCCL on CUDA, gloo on CPU) with its default timeout (NCCL: 10
    minutes), so that a dead peer on another node ends a collective in minutes, not hours; and a
    gloo group for the waits that may be long (every process checking its share of the data, rank 0
    writing a 4B model's checkpoint: ~47 GB), with a timeout of 2 hours."""
    dist.init_process_group("nccl" if cuda else "gloo")
    long = datetime.timedelta(hours=2)
    _waits.append(dist.new_group(backend="gloo", timeout=long))


def start(a):
    """This process and its device. DDP as nanoGPT: torchrun sets RANK; one process a device; NCCL
    on CUDA, gloo on CPU. (ddp, cuda, device, rank, world)"""
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available() and not a.cpu
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ddp:
        init_distributed(cuda)
    rank = dist.get_rank() if ddp else 0
    world = dist.get_world_size() if ddp else 1
    return ddp, cuda, device, rank, world


def agreed(fn, *args):
    """fn(*args) on every process, with no collective inside. A UserError on any process stops them
    all together: each raises every distinct message (processes check parts of the data), in rank
    order, as an agreed error."""
    result = message = None
    try:
        result = fn(*args)
    except data.UserError as e:
        message = str(e)
    if not dist.is_initialized():
        if message is not None:
            raise agreed_error(message)
        return result
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message, group=_waits[-1])
    failed = list(dict.fromkeys(m for m in messages if m is not None))  # distinct, in rank order
    if failed:
        raise agreed_error("\n".join(failed))
    return result


def gathered(items):
    """Every process's list, joined in rank order (on the long waits' group)."""
    if not dist.is_initialized():
        return list(items)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, list(items), group=_waits[-1])
    return [item for part in every for item in part]


def print_notes(master):
    """data.note's notes of every process, each once, by rank 0, with every process's ids."""
    merged = {}
    for text, ids in gathered(data.NOTES):
        merged.setdefault(text, []).extend(ids)
    data.NOTES.clear()
    for text, ids in merged.items() if master else ():
        if ids:
            text = text.replace("{n}", str(len(ids))).replace("{ids}", ", ".join(ids[:5]))
        print(text)


def fail(messages):
    """For agreed: this process's messages, as one UserError."""
    if messages:
        raise data.UserError("\n".join(messages))


def on_rank0(master, what, fn, *args):
    """fn(*args) on rank 0 while the others wait (agreed): an error there stops every process with
    its line (and rank 0's traceback), instead of leaving them at a barrier."""

    def attempt():
        if not master:
            return
        try:
            fn(*args)
        except Exception as e:
            if isinstance(e, data.UserError) or not dist.is_initialized():
                raise
            traceback.print_exc()
            raise data.UserError(f"rank 0: {type(e).__name__}: {e}, while {what}") from e

    agreed(attempt)


_cleanups = []  # what a run undoes when it ends (main's finally, or at exit)


def cleanup():
    global ATTENTION
    while _cleanups:
        _cleanups.pop()()
    ATTENTION = "sdpa"  # a run's --attn_implementation ends with it (the tests run several)


atexit.register(cleanup)


def stop(error, out):
    """Exit 1 with `error: message`. An agreed error is printed by rank 0 alone, and every process
    waits for that before it exits (torchrun stops every process as soon as one exits). Any other is
    this process's own: it says so with its rank, and torchrun stops the rest. An OSError is one
    only when the disk of `out` is full; any other is raised again, with its traceback."""
    if isinstance(error, OSError):
        if not full_disk(error, out):
            raise error
        error = data.UserError(
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


# --------------------------------------------------------------------------------------------------
# Flags and checkpoints, checked before any weights load.

# What each path flag must hold, read from its config.json
CHECKPOINT_FLAGS = {
    "init": ({"llava"}, "a LLaVA checkpoint directory (a previous stage's --out, or an HF LLaVA)"),
    "teacher": ({"llava"}, "a LLaVA checkpoint directory"),
    "vision": (
        {"siglip", "siglip_vision_model", "clip", "clip_vision_model", "llava"},
        "a SigLIP or CLIP checkpoint directory, or a LLaVA one (its vision tower is used)",
    ),
    "llm": (None, "a causal-LM checkpoint directory, e.g. Qwen1.5-0.5B"),
}


def check_checkpoint(flag, path, kinds, what):
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        problem = "no config.json in this directory" if os.path.isdir(path) else "no such directory"
        raise data.UserError(f"--{flag} {path}: {problem}; expected {what}")
    try:
        kind = json.load(open(config)).get("model_type")
    except (ValueError, AttributeError) as e:
        raise data.UserError(
            f"--{flag} {config}: not a JSON object ({e}); expected {what}"
        ) from None
    wrong = kind not in kinds if kinds else kind in (None, "llava")
    if wrong:
        raise data.UserError(f"--{flag} {path}: a {kind!r} checkpoint; expected {what}")
    for name in sorted(os.listdir(path)):  # each file's header (its tensors' places): a torn
        # copy is named here, before anything loads
        if name.endswith(".safetensors"):
            try:
                safetensors.safe_open(os.path.join(path, name), "pt").keys()
            except Exception as e:
                raise data.UserError(
                    f"--{flag} {path}/{name}: cannot be read ({e}); copy it again"
                ) from None
    has = set(os.listdir(path))
    if kind == "llava" and not {"tokenizer_config.json"} <= has:
        raise data.UserError(
            f"--{flag} {path}: no tokenizer_config.json, so no processor; save the model's "
            f"processor there too (AutoProcessor.from_pretrained(ITS_ID).save_pretrained(DIR))"
        )
    if kind == "llava" and not has & {"processor_config.json", "preprocessor_config.json"}:
        raise data.UserError(
            f"--{flag} {path}: no processor_config.json or preprocessor_config.json, so no image "
            f"processor; save the model's processor there too "
            f"(AutoProcessor.from_pretrained(ITS_ID).save_pretrained(DIR))"
        )


# The least value of each numeric flag
NUMERIC_FLAGS = dict(
    global_batch_size=1,
    batch_size=1,
    epochs=1,
    max_length=2,
    max_steps=1,
    plan_gpus=1,
    save_every=0,
    workers=0,
    alpha=0,
    beta=0,
    gamma=0,
    delta=0,
)
# What --resume may change: everything else must be what the checkpoint was written with. A
# checkpoint holds the whole state (AdamW's by parameter name), so DDP and FSDP2 continue each
# other's; --data is compared by what the file holds (data_sha256), not where it is.
MAY_CHANGE = {"resume", "max_steps", "save_every", "workers", "batch_size", "cpu", "plan"}
MAY_CHANGE |= {"ignore_plan", "grad_checkpointing", "images", "out", "auto_resume", "fsdp"}
MAY_CHANGE |= {"plan_gpus", "plan_gib", "attn_implementation", "data"}


def check_resume(a, saved, digest, what=None):
    """--resume with the flags the checkpoint (or the finished stage) was written with (but
    MAY_CHANGE), on the same data."""
    what = what or f"--resume: the checkpoint in {a.out}"
    if saved.get("data_sha256", digest) != digest:
        raise data.UserError(
            f"{what} was written on other data: --data {a.data} does not hold the samples it "
            f"trained on (then at {saved['data']}); continue on those, or give a new --out"
        )
    differ = [k for k, v in vars(a).items() if k not in MAY_CHANGE and k in saved and saved[k] != v]
    if differ:
        was = ", ".join(f"--{k} {saved[k]} (now {getattr(a, k)})" for k in differ)
        raise data.UserError(
            f"{what} was written with {was}; continue with the same flags (these may change: "
            f"{', '.join('--' + k for k in sorted(MAY_CHANGE))}), or give a new --out"
        )


def check_flags(a, world, stage, table):
    """Every user error that the flags alone can show; returns the global batch."""
    if (a.plan_gpus is None) != (a.plan_gib is None):
        raise data.UserError("--plan_gpus N and --plan_gib G come together (the device's GiB)")
    if a.plan_gpus:  # the plan of another machine: no data read, no torchrun
        a.plan = True
    elif not a.data or not a.images:
        raise data.UserError("--data JSON and --images DIR are needed (--plan_gpus: not)")
    elif not os.path.isfile(a.data):
        raise data.UserError(f"--data {a.data}: no such file; expected a LLaVA JSON file")
    elif not os.path.isdir(a.images):
        raise data.UserError(
            f"--images {a.images}: no such directory; expected the folder the JSON's image paths "
            f"are relative to"
        )
    for flag, (kinds, what) in CHECKPOINT_FLAGS.items():
        if getattr(a, flag):
            check_checkpoint(flag, getattr(a, flag), kinds, what)
    for flag, low in NUMERIC_FLAGS.items():
        value = getattr(a, flag)
        if value is not None and value < low:
            raise data.UserError(f"--{flag} {value}: must be at least {low}")
    if a.attn_implementation == "flash_attention_2" and not importlib.util.find_spec("flash_attn"):
        raise data.UserError(
            "--attn_implementation flash_attention_2 needs the flash-attn package (pip install "
            "flash-attn, on a CUDA machine); sdpa needs nothing"
        )
    if a.lr is not None and a.lr <= 0:
        raise data.UserError(f"--lr {a.lr}: must be above 0 (leave it out for Table A9's)")
    global_batch = table["global_batch"] if a.global_batch_size is None else a.global_batch_size
    if global_batch % (a.batch_size * world):
        raise data.UserError(
            f"--global_batch_size {global_batch} must be a multiple of --batch_size "
            f"{a.batch_size} x {world} processes"
        )
    if stage["teacher"] != bool(a.teacher):
        need = "needs --teacher DIR" if stage["teacher"] else "takes no --teacher"
        raise data.UserError(f"--stage {a.stage} {need}")
    for flag in ("init", "teacher"):
        path = getattr(a, flag)
        if path and os.path.realpath(path) == os.path.realpath(a.out):
            raise data.UserError(f"--{flag} and --out are both {a.out}: give the stage a new --out")
    if a.fsdp and "RANK" not in os.environ and not a.plan_gpus:
        raise data.UserError(
            "--fsdp shards the student over processes: start it with torchrun (train.sh: FSDP=1)"
        )
    if not (a.resume or a.init or (a.vision and a.llm)):
        raise data.UserError(
            "give --init DIR (a previous stage's output) or --vision DIR --llm DIR (a new student)"
        )
    return global_batch


ATTENTION = "sdpa"  # --attn_implementation, of every model loaded here (llava_kd.load sets it)


def loaded(cls, path, **kwargs):
    """cls.from_pretrained(path), or an error naming what did not load."""
    kwargs.setdefault("attn_implementation", ATTENTION)
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    bad = {k: info.get(k) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise RuntimeError(f"{path}: weights did not load as expected: {bad}")
    return model


def tower_from_llava(path, cfg):
    """The vision tower of a LLaVA checkpoint in float32, reading only its tensors (the LLM stays on
    disk)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.isfile(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    config = cfg.vision_config
    tower = transformers.AutoModel.from_config(
        config, dtype=torch.float32, attn_implementation=ATTENTION
    )
    state = {}
    # saved as "vision_tower.*" (transformers' older names, still written) or "model.vision_tower.*"
    for name in files:
        with safe_open(os.path.join(path, name), "pt") as f:
            for key in f.keys():
                for prefix in ("vision_tower.", "model.vision_tower."):
                    if key.startswith(prefix):
                        state[key[len(prefix) :]] = f.get_tensor(key)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: the vision tower's weights did not load: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return tower


# What makes two vision towers one shape (their configs)
TOWER_SHAPE = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers")
TOWER_SHAPE += ("num_attention_heads", "image_size", "patch_size", "num_channels")


def check_tower_shape(student, teacher, vision, teacher_path):
    """Before any weight loads (meta models): a new student's tower (--vision) has the shape of the
    teacher's, which it takes (share_tower): its new projector is made for that width."""
    s, t = student.config.vision_config, teacher.config.vision_config
    differ = [k for k in TOWER_SHAPE if getattr(s, k, None) != getattr(t, k, None)]
    if differ:
        what = ", ".join(
            f"{k} {getattr(s, k, None)} (teacher {getattr(t, k, None)})" for k in differ
        )
        raise data.UserError(
            f"--teacher {teacher_path}: its vision tower is not the shape of --vision {vision}'s: "
            f"{what}; a new student takes the teacher's tower: --vision {teacher_path}"
        )


def share_tower(student, teacher, teacher_path, new_student):
    """One vision tower for both where it can be (one copy in memory, one forward a batch: the
    paper's shared visual encoder): the teacher's, when it has the student's weights (equal in bf16:
    a tower stored in another precision is the same tower), or for a new student, whose projector
    has learnt nothing yet. An existing student with another tower keeps it, since its projector
    learnt on it: then each model reads the images with its own. Either change is said in a note."""
    s = student.model.vision_tower.state_dict()
    t = teacher.model.vision_tower.state_dict()
    differ = [k for k in t if not torch.equal(s[k].bfloat16(), t[k].bfloat16())]
    tensors = f"{len(differ)} of {len(t)} tensors differ from the teacher's ({teacher_path})"
    if differ and not new_student:
        data.note(
            f"note: the student keeps its own vision tower ({tensors}; its projector learnt on "
            f"it): each model reads the images with its own tower, a second forward a batch"
        )
        return
    if differ:
        data.note(f"note: the new student takes the teacher's vision tower ({tensors} in --vision)")
    student.model.vision_tower = teacher.model.vision_tower


def check_compatible(teacher, t_proc, student, s_proc):
    """Distillation compares the two models token by token: same token ids, same image token, same
    number of visual tokens an image. Stops with a clear message otherwise."""
    vs, vt = s_proc.tokenizer.get_vocab(), t_proc.tokenizer.get_vocab()
    small, big = sorted((vs, vt), key=len)
    differ = [k for k, i in small.items() if big.get(k) != i]
    problems = []
    if differ:

        def name(p):
            tok = p.tokenizer
            return f"{tok.name_or_path} ({type(tok).__name__}, {len(tok)} tokens)"

        problems.append(
            f"the tokenizers disagree on {len(differ)} tokens (e.g. {differ[:3]}): teacher "
            f"tokenizer {name(t_proc)}, student tokenizer {name(s_proc)}; use a student LLM of "
            f"the teacher's family, with the same tokenizer"
        )
    if teacher.config.image_token_id != student.config.image_token_id:
        problems.append(
            f"image token ids differ: teacher {teacher.config.image_token_id}, "
            f"student {student.config.image_token_id}"
        )
    features = ("vision_feature_layer", "vision_feature_select_strategy")
    t_features, s_features = ([getattr(m.config, k) for k in features] for m in (teacher, student))
    if t_features != s_features:
        problems.append(
            f"the visual features differ (layer, selection): teacher {t_features}, student "
            f"{s_features}; the two share one tower's"
        )
    nt, ns = data.image_seq_length(t_proc), data.image_seq_length(s_proc)
    if nt != ns:
        problems.append(
            f"visual tokens per image differ: teacher {nt}, student {ns} (use the teacher's vision "
            f"tower for the student: --vision TEACHER_DIR)"
        )
    if problems:
        raise data.UserError("teacher and student cannot be distilled:\n  " + "\n  ".join(problems))


def note_chat_formats(s_proc, t_proc, path):
    """A note when the two chat templates render a conversation differently."""

    def rendered(p):
        if not p.chat_template:
            return "(no chat template)"
        return data.render(p.tokenizer, p.chat_template, data.PROBE["string"])

    s, t = rendered(s_proc), rendered(t_proc)
    if s != t:
        i = next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t)))
        data.note(
            f"note: the student's and the teacher's ({path}) chat templates render a conversation "
            f"differently from character {i}: student {s[i : i + 60]!r}, teacher "
            f"{t[i : i + 60]!r}. The teacher reads the student's format in dft: it distils best "
            f"when the student uses the teacher's template."
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
    raise data.UserError(f"{path}: cut short or damaged ({found}); expected keys {', '.join(keys)}")


def checkpoint_problem(path):
    """None for a complete checkpoint directory; else what is wrong with it."""
    marker = os.path.join(path, COMPLETE)
    if not os.path.isfile(marker):
        return "its save did not finish"
    try:
        files = read_marker(marker, ("step", "files"))["files"]
    except data.UserError as e:
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
    raise data.UserError(
        f"--resume: no complete checkpoint in {out} ({seen}); start again on a new --out"
    )


def continue_out(a, master, digest):
    """--auto_resume (train.sh): what --out holds decides. The stage finished there with these
    flags: True, skip it. A complete checkpoint: resume it (a damaged done.json: published again).
    Nothing: start (dropping what a crash before the first checkpoint left). Another setting than
    the one it was started with: refused."""
    path = os.path.join(a.out, DONE)
    resumable = newest_checkpoint(a.out)[0] is not None
    if os.path.isfile(path):
        try:
            done = read_marker(path, ("step", "args"))
        except data.UserError as e:
            if not resumable:
                raise data.UserError(f"{e}: delete {a.out} to run the stage again") from None
            done = None  # published again from the checkpoint
        if done is not None:
            check_resume(a, done["args"], digest, f"{path}: the stage finished in {a.out}")
        if done is not None and done["args"].get("max_steps") == a.max_steps:
            if master:
                print(f"stage {a.stage}: finished in {a.out} (step {done['step']}): skipped")
            for name in CHECKPOINTS if master and done.get("finished") else ():
                shutil.rmtree(os.path.join(a.out, name), ignore_errors=True)  # a stop left it
            return True
        if not resumable:
            raise data.UserError(
                f"{path}: the stage finished at step {done['step']} and its checkpoint was "
                f"removed, so it cannot go on to --max_steps {a.max_steps}: give a new --out"
            )
    a.resume = resumable
    return False


def claim_out(a, master):
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
                raise data.UserError(
                    f"--out {a.out} is in use by process {pid} on {host} ({path}): wait for that "
                    f"run, or give another --out (if that process is gone, delete {path})"
                ) from None
            os.remove(path)  # left by a run that died on this host: taken over
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except OSError as e:  # read-only, not a directory, ...
            raise data.UserError(
                f"--out {a.out}: cannot be written ({type(e).__name__}: {e.strerror}); give an "
                f"--out this process can write"
            ) from None
        os.write(fd, me.encode())
        os.close(fd)
        _cleanups.append(lambda: release_out(path, me))
    names = ("config.json", "log.jsonl", *CHECKPOINTS)
    held = [n for n in names if os.path.exists(os.path.join(a.out, n))]
    newest, problems = newest_checkpoint(a.out)
    if ("config.json" in held or newest) and not a.resume:
        damaged = "".join(f"; {p}" for p in problems)
        raise data.UserError(
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


class Preemption:
    """SIGTERM (schedulers before a kill), SIGUSR1, SIGINT, SIGHUP (a dropped ssh session), SIGQUIT:
    the first asks the loop to stop after the current optimizer step, with a checkpoint. One request
    often arrives twice (SLURM signals every process, and torchrun forwards the same signal a moment
    later): another signal within REPEAT seconds is that request; a later one stops at once. Before
    the first step, a request ends the run at once: there is nothing to save.

    A step that has not ended WAIT seconds (or 3 of the slowest step's) after the request ends the
    process without saving: a process stuck in a collective with a dead peer (NCCL waits for
    minutes) must not wait out the launcher's shutdown timeout. Python runs a signal's handler only
    once the main thread is back from C++, which a stuck collective never is; but the signal's byte
    reaches a wakeup pipe at once, and a watching thread reads it."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
    REPEAT = 60
    WAIT = 120

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.received = None
        self.at = None
        self.stepping = False  # the loop has begun its first step
        self.in_step = False
        self.began = 0.0  # when the step under way began
        self.slowest = 0.0
        self.before = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        read, self.write = os.pipe()
        os.set_blocking(self.write, False)
        self.wakeup = signal.set_wakeup_fd(self.write)
        self.watcher = threading.Thread(target=self.watch, args=(read,), daemon=True)
        self.watcher.start()
        _cleanups.append(self.restore)

    def handle(self, signum, frame):
        if self.received is not None and time.monotonic() - self.at < self.REPEAT:
            return
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name
        self.at = time.monotonic()
        if not self.stepping:
            raise data.UserError(
                f"stopped by {self.received} before the first step: nothing to save; run the "
                f"same command again to go on"
            )
        print(
            f"{self.received}: stopping after this step, with a checkpoint (a signal again after "
            f"{self.REPEAT} s: at once)",
            file=sys.stderr,
            flush=True,
        )

    def step_begins(self):
        self.stepping = self.in_step = True
        self.began = time.monotonic()

    def step_ended(self, seconds):
        """The loop, once a step's collectives are done. A save is not watched (a 4B model's takes
        minutes); one stuck in a collective is ended by the process group's timeout."""
        self.in_step = False
        self.slowest = max(self.slowest, seconds)

    def watch(self, read):
        """The thread: from the first request on, ends the process if a step outlasts the bound."""
        signums = {int(s) for s in self.SIGNALS}
        while True:
            got = os.read(read, 64)  # each byte a signal's number, written by Python's C handler
            if not got:  # restore closed the pipe: the run is over
                os.close(read)
                return
            if signums & set(got):
                break
        at = time.monotonic()
        while self.write is not None:
            time.sleep(0.5)
            bound = max(self.WAIT, 3 * self.slowest)
            if self.in_step and time.monotonic() - max(at, self.began) > bound:
                print(  # on a line of its own: the progress bar's has no end
                    f"\nerror: stopped by a signal, and the step under way did not end within "
                    f"{bound:.0f} s (a process that died, or a collective that does not end): "
                    f"stopped without saving; the last checkpoint in {self.checkpoint} stands: "
                    f"run the same command again",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    def restore(self):
        signal.set_wakeup_fd(self.wakeup)
        os.close(self.write)
        self.write = None
        self.watcher.join(timeout=1)
        for s, handler in self.before.items():
            signal.signal(s, handler)


def ignore_signals(worker_id):
    """A data loader worker's start: the signals are the training process's to act on."""
    for s in Preemption.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def loader_batches(loader):
    """The loader's batches. A worker that dies (the host's OOM killer takes them first) is found
    when its batch is due (the loader checks its workers while it waits), not by torch's SIGCHLD
    handler, which would raise anywhere in the step; so the loop can stop at the last whole step."""
    batches = iter(loader)
    if loader.num_workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    yield from batches


def epoch_order(ds, global_batch, batch, world, rank, seed, epoch, grouped=False):
    """This process's sample indices of one epoch, in order, from the seed and the epoch alone (so a
    resumed run sees what an uninterrupted one would): the epoch's floor(N / global_batch) optimizer
    steps, every sample in at most one. Shuffled as DistributedSampler shuffles; grouped, as LLaVA's
    group_by_modality_length: samples with an image and text-only ones apart, each optimizer step's
    samples sorted by length, so a micro-batch (and the same micro-step on every process) pads
    to lengths alike."""
    if not grouped:
        sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        return list(sampler)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(len(ds), generator=g).tolist()
    # a length from the text alone (characters / 4) and the image's tokens: no tokenizing
    length = [
        sum(len(t["value"]) for t in conv) // 4 + (image is not None) * ds.n_image_tokens
        for _, image, conv in ds.rows
    ]
    kinds = [[i for i in perm if (ds.rows[i][1] is None) == text] for text in (False, True)]
    steps, rest = [], []
    for kind in kinds:  # whole optimizer steps of one kind
        whole = len(kind) // global_batch * global_batch
        steps += [kind[s : s + global_batch] for s in range(0, whole, global_batch)]
        rest += kind[whole:]
    whole = len(rest) // global_batch * global_batch  # then what is left of both, mixed
    steps += [rest[s : s + global_batch] for s in range(0, whole, global_batch)]
    order = []
    for k in torch.randperm(len(steps), generator=g).tolist():
        step = sorted(steps[k], key=lambda i: -length[i])  # micro-batch j: process j % world
        micro = [step[j : j + batch] for j in range(0, global_batch, batch)]
        order += [i for m in micro[rank::world] for i in m]
    return order


def loader_workers(asked):
    """--workers, or the CPUs this process may run on, shared by its node's processes, less one for
    the process itself, 8 at most (an image takes ~22 ms to decode and process: 8 a micro-batch)."""
    if asked is not None:
        return asked
    cpus = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(8, cpus - 1))


def micro_batches(a, r, rank, world, step):
    """This process's micro-batches from optimizer step `step` on. The order depends only on the
    seed and the epoch, so a resumed run sees what an uninterrupted one would have."""
    collate = functools.partial(data.collate, pad_token_id=r.processor.tokenizer.pad_token_id)
    per_step = r.accum * a.batch_size
    while True:
        epoch, skip = divmod(step, r.steps_per_epoch)
        args = (r.ds, r.global_batch, a.batch_size, world, rank, a.seed, epoch, a.group_by_length)
        order = epoch_order(*args)[skip * per_step : r.steps_per_epoch * per_step]
        loader = torch.utils.data.DataLoader(
            r.ds,
            a.batch_size,
            sampler=order,
            collate_fn=collate,
            num_workers=loader_workers(a.workers),
            worker_init_fn=ignore_signals,
            pin_memory=r.model.device.type == "cuda",  # copied without the host waiting
        )
        yield from loader_batches(loader)
        step = (epoch + 1) * r.steps_per_epoch


def take(batches, n):
    """The next n micro-batches, or one that names a dead loader worker as its error: the loader
    says so, or, when the worker died while handing over a batch's shared memory, the connection
    to it breaks."""
    try:
        return [next(batches) for _ in range(n)]
    except (RuntimeError, ConnectionError, EOFError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        if isinstance(e, RuntimeError) and not first.startswith("DataLoader worker"):
            raise
        died = first if isinstance(e, RuntimeError) else f"a DataLoader worker died ({e!r})"
        why = f"{died} (if the host ran out of memory: fewer --workers)"
        return [dict(errors=[why], fix="--resume")]


def check_lengths(source, a, chat, samples, rank, world):
    """Every answer's length (LlavaDataset.check_lengths) with the processor of the checkpoint
    `source` alone: no weights read."""
    processor = transformers.AutoProcessor.from_pretrained(source)
    data.prepare_chat(processor, transformers.GenerationConfig(), source, end_is_eos=chat)
    ds = data.LlavaDataset(a.data, a.images, processor, chat, a.max_length, samples)
    return ds.check_lengths(rank, world, a.drop_too_long)


def leave_out(ds, indices, global_batch, out, master):
    """--drop_too_long: the samples that check_lengths left out (every process's), gone from ds on
    every process alike; their ids in out/left_out.json."""
    gone = set(indices)
    ids = [row[0] for i, row in enumerate(ds.rows) if i in gone]
    ds.rows = [row for i, row in enumerate(ds.rows) if i not in gone]
    if master:
        with open(os.path.join(out, "left_out.json"), "w") as f:
            json.dump(ids, f)
    if len(ds) < global_batch:
        raise agreed_error(
            f"{ds.json_path}: {len(ds)} samples are left, fewer than one global batch "
            f"({global_batch}), once --drop_too_long left out {len(ids)}"
        )


def readable(load, path, *args):
    """load(path, ...), or one line naming the checkpoint that did not load (--resume, --init)."""
    try:
        return load(path, *args)
    except data.UserError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # what a damaged file raises
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise data.UserError(f"{path}: cannot be loaded ({type(e).__name__}: {first})") from None


def read_train_state(path):
    """The step, counts, AdamW state and flags of a checkpoint, as tensors and plain values only: a
    pickled object in a file someone shared could run code here, so weights_only refuses it."""
    try:
        # to the CPU: saved from cuda:0, it would land on cuda:0 on every rank; the optimizer's
        # load_state_dict moves each tensor beside its parameter. Mapped, not read: the AdamW state
        # of a 4B model is ~32 GB, and 8 processes share the file's pages
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as e:
        raise data.UserError(
            f"--resume: {path} holds more than tensors and plain values, so it is not loaded "
            f"({type(e).__name__}); resume only from checkpoints this program wrote"
        ) from None


# --------------------------------------------------------------------------------------------------
# Saving: stock checkpoints, and what --resume needs.


def hold_frozen_in_bf16(model, cuda):
    """On CUDA, the frozen Linear and Conv2d weights that bf16 holds exactly (those of a bf16
    checkpoint: most published ones) are held in bf16. Autocast ran them in bf16 anyway, the same
    numbers, now without a cast at each use and each recompute, in half the memory. A weight tied to
    the embeddings stays (the residual stream stays float32). Checkpoints save them in float32."""
    tied = model.get_input_embeddings().weight
    for m in model.modules() if cuda else []:
        w = getattr(m, "weight", None)
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or w.requires_grad or w is tied:
            continue
        if w.dtype == torch.float32 and torch.equal(w.bfloat16().float(), w):
            w.data = w.data.bfloat16()
            w.held_in_bf16 = True


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


def full_disk(error, path):
    """Whether a write failed for want of space: ENOSPC, as an OSError or in the message of the
    error of a library that writes on its own (torch.save, safetensors: "os error 28")."""
    by_errno = getattr(error, "errno", None) == errno.ENOSPC
    by_message = os.strerror(errno.ENOSPC) in str(error)
    return by_errno or by_message or shutil.disk_usage(path).free < 2**26


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
        if not full_disk(e, out):
            raise
        raise data.UserError(
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
        if name in ("train_state.pt", COMPLETE):  # what --resume alone reads
            continue
        tmp = os.path.join(out, name + ".tmp")
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(os.path.join(ckpt, name), tmp)
        except OSError:  # a filesystem without hard links
            shutil.copy(os.path.join(ckpt, name), tmp)
        os.replace(tmp, os.path.join(out, name))
    with open(os.path.join(out, DONE + ".tmp"), "w") as f:
        json.dump(dict(step=step, args=args, finished=finished), f)
    os.replace(os.path.join(out, DONE + ".tmp"), os.path.join(out, DONE))
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


def save(a, r, master, done):
    """out/checkpoint after `done` steps (under FSDP every process gathers the full state). Rank 0
    writes, the others wait: nobody runs ahead of a checkpoint being written."""
    full_weights, opt_state = full_state(r.student, r.opt) if a.fsdp else (None, None)
    state = dict(
        step=done,
        total=r.total,
        global_batch=r.global_batch,
        seed=a.seed,
        optimizer=opt_state if a.fsdp else rekeyed(r.opt.state_dict(), dict(enumerate(r.names))),
        args=r.args,
    )
    what = f"writing the checkpoint of step {done} (the last complete one is kept: --resume)"
    on_rank0(master, what, save_checkpoint, r.model, r.processor, state, a.out, full_weights)


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
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return open(path, "a")


# --------------------------------------------------------------------------------------------------
# FSDP2, the loop's --fsdp.


def shard(student, model, bf16):
    """FSDP2 instead of DDP: parameters, gradients and AdamW state split over the processes. Each
    decoder layer is a group; the root group (embeddings, final norm, head, projector) is whole
    through the root's forward, where fused_loss reads the head. The frozen vision tower, shared
    with the teacher and run before the student, stays whole on every process; so does the teacher.
    On several nodes: sharded within a node, replicated across nodes (HSDP, a 2-D mesh), so that a
    step's all-gathers stay on the node's own links."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 (on CUDA): parameters gathered in bf16, gradients reduced in float32
    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    nodes = dist.get_world_size() // per_node
    device = model.lm_head.weight.device.type
    mesh = init_device_mesh(device, (nodes, per_node), mesh_dim_names=("replicate", "shard"))
    mesh = mesh if nodes > 1 else mesh["shard"]
    if dist.get_rank() == 0:
        print(f"FSDP2: sharded over {per_node} processes, replicated over {nodes} node(s)")
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    tower = set(model.model.vision_tower.parameters())
    return fully_shard(student, mesh=mesh, mp_policy=policy, ignored_params=tower)


# --------------------------------------------------------------------------------------------------
# Memory, as logged.


def trained_bytes(params, opt):
    """This process's bytes of trained parameters, their gradients and AdamW state (its shards under
    FSDP)."""
    grads = [p.grad for p in params if p.grad is not None]
    moments = [x for s in opt.state.values() for x in s.values()]
    tensors = [*params, *grads, *moments]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP: DTensors
    return sum(t.numel() * t.element_size() for t in local)


def peak_bytes(device):
    """The peak of memory allocated (CUDA), or on a CPU the process's peak resident memory and the
    pages of the checkpoint files it maps that were never read in (a frozen teacher's embedding
    rows no token looked up): a GPU holds those weights whole, and so does the plan."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + unread_mapped_bytes()


def unread_mapped_bytes():
    """The bytes of this process's mapped .safetensors files not resident (/proc/self/smaps)."""
    unread, mapped = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            field = line.split()
            if "-" in field[0] and ":" not in field[0]:  # a mapping's header: range, ..., path
                mapped = field[-1].endswith(".safetensors")
            elif mapped and field[0] == "Size:":
                unread += int(field[1]) * 1024
            elif mapped and field[0] == "Rss:":
                unread -= int(field[1]) * 1024
    return unread


def peak_reserved_bytes(device):
    """CUDA: the peak the caching allocator held (what the device must have); CPU: as peak_bytes."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    return peak_bytes(device)


# --------------------------------------------------------------------------------------------------
# The memory plan: bytes a process holds at its peak (the end of a micro-batch's forward, where the
# activations, the loss's gradients and the weights meet), from the configs alone, printed before
# any weight loads. GiB = 2**30 bytes.

# Saved activations a token a decoder layer (Qwen2/Llama: attention + SwiGLU MLP), measured with
# saved_tensors_hooks (test_plan.py measures them again): bytes = a_D x hidden + a_I x intermediate,
# and a row of the attention mask: each layer converts the padded batch's [T, T] mask to the query's
# dtype and keeps it. float32: 10 hidden-wide tensors (two RMSNorms' inputs and outputs, q, k, v,
# the projections' inputs) and 4 intermediate-wide (gate, up, act(gate), their product); bf16
# autocast: the norms stay float32, each projection's input is its own bf16 cast (34 x hidden on a
# CPU; 36 allows the attention output that CUDA's kernels save beside).
ACTIVATIONS = {torch.float32: (40, 16), torch.bfloat16: (36, 8)}
# fused_loss's block, logits (the loop's): on CUDA 883 rows of Qwen's 151936, the heads read once
# a block; [rows, V] float32 tensors alive in a block (2.7 measured, peak RSS)
LOSS_BLOCK = dict(cuda=2**27, cpu=2**24)
BLOCK_TENSORS = 3
CPU_RUNTIME = 0.42 * 2**30  # python, torch, transformers and the data (the toy: 0.41 measured)
CUDA_RUNTIME = 1.0 * 2**30  # CUDA context, NCCL buffers (an estimate; nothing on a CPU shows it)


def meta_llava(path=None, vision=None, llm=None):
    """The LLaVA that a checkpoint directory (or --vision + --llm) describes, on the meta device:
    every parameter's shape, without reading a weight."""
    if path:
        cfg = transformers.AutoConfig.from_pretrained(path)
    else:
        v = transformers.AutoConfig.from_pretrained(vision)
        v = getattr(v, "vision_config", v)  # a SigLIP/CLIP/LLaVA checkpoint: its tower's config
        t = transformers.AutoConfig.from_pretrained(llm)
        cfg = transformers.LlavaConfig(
            vision_config=v, text_config=t, tie_word_embeddings=t.tie_word_embeddings
        )
    with torch.device("meta"):
        return transformers.LlavaForConditionalGeneration(cfg)


def numel(module, trained=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trained)


def activation_bytes(text, batch, length, dtype, checkpointing, residual=4):
    """The student LLM's saved activations for a micro-batch of `batch` x `length` tokens: every
    layer's (the graph holds them until backward), or with checkpointing each layer's input (the
    residual stream: float32, bf16 under FSDP2's bf16 policy) and one layer's recomputed set."""
    a_d, a_i = ACTIVATIONS[dtype]
    tokens = batch * length
    mask = batch * length**2 * dtype.itemsize
    layer = tokens * (a_d * text.hidden_size + a_i * text.intermediate_size) + mask
    layers = text.num_hidden_layers
    if checkpointing:
        return layers * tokens * text.hidden_size * residual + layer
    return layers * layer


def memory_plan(
    student, teacher, batch, max_length, world, cuda, fsdp, gamma, per_node=None, accum=1
):
    """Per process: [(what, bytes, when)], when = "held" (the whole run), "forward" (at the end of
    a micro-batch's forward and backward's start, with one row of each pair "..., checkpointing
    off/on") or "step" (the optimizer's). student/teacher: meta models, the student's requires_grad
    set for the stage. FSDP2 shards over the processes of a node (per_node; replicated across
    nodes); accum: micro-steps an optimizer step."""
    text = student.config.text_config
    D, V = text.hidden_size, text.vocab_size
    tokens = batch * max_length
    size = 2 if cuda else 4  # the teacher's bytes an element (bf16 on CUDA)
    tower = numel(student.model.vision_tower)
    rest = numel(student) - tower  # projector + LLM, float32 masters
    trained = numel(student, trained=True)
    layers = student.model.language_model.layers
    layer = numel(layers[0])
    root = rest - len(layers) * layer  # FSDP's root group: embeddings, norm, head, projector
    shards = min(world, per_node or world) if fsdp else 1
    held_grads = (world > 1 and not fsdp) or accum > 1  # through the next micro-step's forward
    rows = [
        ("student weights, float32 (vision tower whole)", 4 * rest / shards + 4 * tower, "held"),
        # DDP keeps them in its buckets; otherwise freed after each step, made again in backward
        # (FSDP2: reduce-scattered each micro-step, their shards summed across micro-steps)
        ("gradients, float32", 4 * trained / shards, "held" if held_grads else "step"),
        ("AdamW moments, float32", 8 * trained / shards, "held"),
    ]
    t_hidden = 0
    if teacher is not None:
        t_hidden = teacher.config.text_config.hidden_size
        frozen = numel(teacher) - numel(teacher.model.vision_tower)  # the tower is the student's
        gram = 4 * (t_hidden**2 + D**2) if gamma else 0  # W^T W of both heads, for L_rel
        rows.append(("teacher, frozen (the tower is the student's)", size * frozen, "held"))
        rows.append(("W^T W of both heads", gram, "held"))
    base = ("CUDA context, NCCL (estimate)", CUDA_RUNTIME) if cuda else ("Python", CPU_RUNTIME)
    rows.append((*base, "held"))
    # FSDP2: the root group whole through forward and backward, two layers gathered at a time
    gathered = size * (2 * root + 2 * layer) if fsdp else 0
    rows.append(("FSDP2's gathered parameters", gathered, "forward"))
    # DDP on CUDA: autocast's bf16 copies of the LLM's weights, saved for backward (a frozen
    # weight's too, unless checkpointing recomputes its layer)
    llm = student.model.language_model
    trained_llm = numel(llm, trained=True)
    all_llm = numel(llm)
    for checkpointing in (False, True):
        copies = 2 * (trained_llm if checkpointing else all_llm) if cuda and not fsdp else 0
        on = ("off", "on")[checkpointing]
        rows.append(
            (f"bf16 copies of the weights (autocast), checkpointing {on}", copies, "forward")
        )
    # fused_loss: dL/dW [V, D] and dL/dh in float32 and the hidden states of both models; then the
    # larger of one block's [rows, V] tensors (with, on CUDA, the head's bf16 copy under DDP, and
    # under FSDP2 the float32 copy of the bf16 head that W_s^T W_s is made from) and backward's
    # start, which scales dL/dW and dL/dh into new tensors (FSDP2: and casts dL/dW to bf16)
    head = 4 * V * D if student.lm_head.weight.requires_grad else 0
    hidden = (2 if cuda and fsdp else 4) * tokens * D + 4 * tokens * D + size * tokens * t_hidden
    block = BLOCK_TENSORS * 4 * min(LOSS_BLOCK["cuda" if cuda else "cpu"], tokens * V)
    if cuda:
        block += 0 if fsdp else 2 * V * D
        block += 4 * V * D if fsdp and teacher is not None and gamma else 0
    backward = head + 4 * tokens * D + (2 * V * D if cuda and fsdp and head else 0)
    loss = head + hidden + max(block, backward)
    rows.append(("loss work tensors (lean path), hidden states", loss, "forward"))
    residual = 2 if cuda and fsdp else 4
    for checkpointing in (False, True):
        dtype = torch.bfloat16 if cuda else torch.float32
        act = activation_bytes(text, batch, max_length, dtype, checkpointing, residual)
        rows.append((f"activations, checkpointing {('off', 'on')[checkpointing]}", act, "forward"))
    # fused AdamW (CUDA, DDP): no temporaries; foreach (CUDA, FSDP2): one full-size list; the
    # CPU's loop: two of the largest parameter's size
    largest = max(p.numel() for p in student.parameters() if p.requires_grad)
    temporaries = 0 if cuda and not fsdp else 4 * trained / shards if cuda else 8 * largest
    rows.append(("AdamW step temporaries", temporaries, "step"))
    return rows


def plan_total(rows, checkpointing, cuda=False):
    """What is held, and the larger of the end of a forward and the optimizer step; on CUDA 10% more
    for the caching allocator's fragmentation (an estimate: no CPU shows it)."""
    skip = f"checkpointing {('on', 'off')[checkpointing]}"
    kept = [(b, when) for what, b, when in rows if not what.endswith(skip)]
    held, forward, step = (
        sum(b for b, w in kept if w == when) for when in ("held", "forward", "step")
    )
    return (held + max(forward, step)) * (1.1 if cuda else 1.0)


def device_bytes(device):
    """A GPU's memory, or on a CPU this process's share of the machine's (processes share it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def check_memory(a, world, device, student, teacher, master, global_batch=None):
    """Prints the plan (rank 0) and stops, naming what would fit, when this run's does not."""
    cuda = device.type == "cuda" or bool(a.plan_gpus)  # --plan_gpus: what its GPUs would hold
    limit = a.plan_gib * 2**30 if a.plan_gpus else device_bytes(device)
    per_node = a.plan_gpus or int(os.environ.get("LOCAL_WORLD_SIZE", world))

    def total(batch, fsdp, checkpointing):
        accum = (global_batch or batch * world) // (batch * world)
        plan = (a.max_length, world, cuda, fsdp, a.gamma, per_node, accum)
        rows = memory_plan(student, teacher, batch, *plan)
        return rows, plan_total(rows, checkpointing, cuda)

    ddp, _ = total(a.batch_size, False, False)
    sharded, _ = total(a.batch_size, True, False)
    mode = f"FSDP2 x {world}" if a.fsdp else "DDP" if world > 1 else "one process"
    _, need = total(a.batch_size, a.fsdp, a.grad_checkpointing)
    _, checkpointed = total(a.batch_size, a.fsdp, True)
    if need > limit >= checkpointed:  # on where the stage needs it (the flag forces it anywhere)
        a.grad_checkpointing = True
        if master:
            print(
                f"note: --grad_checkpointing turned on: the plan is {need / 2**30:.1f} GiB without"
            )
        need = checkpointed
    ckpt = "on" if a.grad_checkpointing else "off"
    if master:
        where = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else "CPU, "
        where = "--plan_gib's " if a.plan_gpus else where
        print(
            f"memory plan, GiB a process ({a.stage}; micro-batch {a.batch_size} x {a.max_length} "
            f"tokens; {'bf16 autocast' if cuda else 'float32'}; {world} process(es)):"
        )
        columns = [ddp, sharded] if world > 1 else [ddp]
        heads = ["DDP", f"FSDP2 x {world}"] if world > 1 else ["one process"]
        print(f"  {'':68s}" + "".join(f"{h:>13s}" for h in heads))
        when = {"held": "held", "forward": "forward", "step": "opt step"}
        lines = [(f"{name} [{when[w]}]", name) for name, _, w in ddp]
        lines += [(f"total, checkpointing {c}", c) for c in ("off", "on")]
        for label, name in lines:
            cells = []
            for rows in columns:
                found = {what: b for what, b, _ in rows}
                found["off"] = plan_total(rows, False, cuda)
                found["on"] = plan_total(rows, True, cuda)
                cells.append(f"{found[name] / 2**30:13.2f}")
            print(f"  {label:68s}" + "".join(cells))
        print(
            "  (total: what is held + the larger of the end of a forward and the optimizer step"
            f"{'; + 10% for fragmentation' if cuda else ''})"
        )
        print(
            f"plan: {need / 2**30:.2f} GiB a process ({mode}, checkpointing {ckpt}) of "
            f"{limit / 2**30:.1f} GiB ({where}device memory)"
        )
    if need <= limit or a.ignore_plan:
        return
    # what would fit, in the order that costs least: checkpointing, sharding, a smaller micro-batch
    options = [(a.batch_size, a.fsdp, True)]
    if world > 1:
        options += [(a.batch_size, True, a.grad_checkpointing), (a.batch_size, True, True)]
    batch = a.batch_size // 2
    while batch >= 1:
        options.append((batch, a.fsdp or world > 1, True))
        batch //= 2
    for batch, fsdp, checkpointing in options:
        _, fits = total(batch, fsdp, checkpointing)
        if fits <= limit:
            changes = []
            if checkpointing and not a.grad_checkpointing:
                changes.append("--grad_checkpointing")
            if fsdp and not a.fsdp:
                changes.append("--fsdp (train.sh: FSDP=1)")
            if batch != a.batch_size:
                changes.append(f"--batch_size {batch} (train.sh: BATCH={batch})")
            advice = f"{' and '.join(changes)} fits ({fits / 2**30:.1f} GiB)"
            break
    else:
        advice = "nothing tried fits: more GPUs with --fsdp, or a shorter --max_length"
    raise data.UserError(
        f"memory plan: {need / 2**30:.1f} GiB a process ({mode}, checkpointing {ckpt}, "
        f"--batch_size {a.batch_size}, --max_length {a.max_length}) exceeds the "
        f"{limit / 2**30:.1f} GiB of the device; {advice} (--ignore_plan runs it anyway)"
    )


# --------------------------------------------------------------------------------------------------
# The command line's flags.


def parser(description, stages):
    """llava_kd.py's command line: `train` and its flags."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "train",
        help="one stage: pt, dpt, sft or dft",
        description="One stage of the recipe (Table A9's lr and global batch by default). One "
        "process: python llava_kd.py train ...; one node: torchrun --standalone "
        "--nproc_per_node=N llava_kd.py train ...; several nodes: torchrun --nnodes, --node_rank, "
        "--master_addr on each. Outputs: --out holds the model and processor, log.jsonl and "
        "checkpoint/ (--resume continues from it).",
    )
    p.add_argument("--stage", required=True, choices=stages)
    p.add_argument("--data", help="LLaVA JSON")
    p.add_argument("--images", help="folder the JSON's image paths are relative to")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--init", help="continue from this LLaVA checkpoint (the previous stage's --out)"
    )
    p.add_argument("--vision", help="a new student: SigLIP/CLIP checkpoint, or a LLaVA's tower")
    p.add_argument("--llm", help="a new student: Qwen2-style causal LM checkpoint")
    p.add_argument("--teacher", help="LLaVA checkpoint of the teacher (dpt, dft)")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of L_res (0: off)")
    p.add_argument("--beta", type=float, default=1.0, help="weight of L_vis (0: off)")
    p.add_argument("--gamma", type=float, default=0.5, help="weight of L_rel (0: off)")
    p.add_argument("--delta", type=float, default=0.0, help="weight of L_pro, Table A6 (0: off)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: Table A9, by stage)")
    p.add_argument("--global_batch_size", type=int, help="default: Table A9, by stage")
    p.add_argument("--batch_size", type=int, default=4, help="per process")
    p.add_argument("--epochs", type=int, help="default: Table A9 (1)")
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument(
        "--drop_too_long",
        action="store_true",
        help="leave out the samples with no answer token within --max_length (default: refuse "
        "the data); their ids go to --out/left_out.json",
    )
    p.add_argument("--max_steps", type=int, help="stop after this many steps of the stage")
    p.add_argument("--save_every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    p.add_argument(
        "--auto_resume",
        action="store_true",
        help="what --out holds decides (train.sh): a stage finished there is skipped, a "
        "checkpoint resumed, else the stage starts",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--plan", action="store_true", help="print the memory plan, load nothing, stop")
    p.add_argument("--plan_gpus", type=int, help="--plan for N GPUs (bf16), without data or GPU")
    p.add_argument("--plan_gib", type=float, help="with --plan_gpus: each GPU's memory, GiB")
    p.add_argument("--ignore_plan", action="store_true", help="run when the plan says it won't fit")
    p.add_argument(
        "--workers",
        type=int,
        help="data loader processes (default: this process's share of the CPUs, less one, <= 8)",
    )
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")
    p.add_argument(
        "--group_by_length",
        action="store_true",
        help="micro-batches of samples alike in length, image and text-only apart (LLaVA's "
        "group_by_modality_length; train.sh's real recipe)",
    )
    p.add_argument(
        "--attn_implementation",
        choices=["sdpa", "eager", "flash_attention_2"],
        default="sdpa",
        help="attention of both models (flash_attention_2: CUDA, with flash-attn installed)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the student over the processes (FSDP2) instead of DDP: for students whose "
        "weights, gradients and AdamW state do not fit one GPU",
    )
    return ap


# --------------------------------------------------------------------------------------------------
# train.sh's launcher.


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
