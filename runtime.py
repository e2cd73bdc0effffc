"""What a run needs around the method, which a reader beside the paper can skip: flags and
checkpoints checked before anything heavy loads, errors that stop every process together,
checkpoints written so that a crash keeps the last one, the log."""

import json
import os
import resource
import shutil
import sys

import torch
import torch.distributed as dist
import transformers

import data

# --------------------------------------------------------------------------------------------------
# Errors: a UserError is the user's to fix; the command line prints its message alone, exit 1.


def agreed_error(message):
    """A UserError that every process raises at the same point (it came from values they share)."""
    error = data.UserError(message)
    error.agreed = True
    return error


def agreed(fn, *args):
    """fn(*args) on every process, with no collective inside. A UserError on any process stops them
    all together: each raises the first process's message, as an agreed error."""
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
    dist.all_gather_object(messages, message)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        where = "" if all(m == message for _, m in failed) else f"(rank {rank}) "
        raise agreed_error(where + message)
    return result


def stop(error):
    """Exit 1 with `error: message`. An agreed error is printed by rank 0 alone, and every process
    waits for that before it exits (torchrun stops every process as soon as one exits). Any other is
    this process's own: it says so with its rank, and torchrun stops the rest."""
    if not dist.is_initialized():
        raise SystemExit(f"error: {error}") from None
    rank = dist.get_rank()
    if getattr(error, "agreed", False):
        if rank == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        dist.barrier()
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
    kind = json.load(open(config)).get("model_type")
    wrong = kind not in kinds if kinds else kind in (None, "llava")
    if wrong:
        raise data.UserError(f"--{flag} {path}: a {kind!r} checkpoint; expected {what}")


def check_flags(a, world, stage, table):
    """Every user error that the flags alone can show; returns the global batch."""
    if not os.path.isfile(a.data):
        raise data.UserError(f"--data {a.data}: no such file; expected a LLaVA JSON file")
    if not os.path.isdir(a.images):
        raise data.UserError(
            f"--images {a.images}: no such directory; expected the folder the JSON's image paths "
            f"are relative to"
        )
    for flag, (kinds, what) in CHECKPOINT_FLAGS.items():
        if getattr(a, flag):
            check_checkpoint(flag, getattr(a, flag), kinds, what)
    global_batch = a.global_batch_size or table["global_batch"]
    if global_batch % (a.batch_size * world):
        raise data.UserError(
            f"--global_batch_size {global_batch} must be a multiple of --batch_size "
            f"{a.batch_size} x {world} processes"
        )
    if stage["teacher"] != bool(a.teacher):
        need = "needs --teacher DIR" if stage["teacher"] else "takes no --teacher"
        raise data.UserError(f"--stage {a.stage} {need}")
    if a.resume and not os.path.isfile(os.path.join(a.out, "checkpoint", "train_state.pt")):
        where = os.path.join(a.out, "checkpoint")
        raise data.UserError(f"--resume: no checkpoint in {where} to continue from")
    if a.fsdp and "RANK" not in os.environ:
        raise data.UserError(
            "--fsdp shards the student over processes: start it with torchrun (train.sh: FSDP=1)"
        )
    if not (a.resume or a.init or (a.vision and a.llm)):
        raise data.UserError(
            "give --init DIR (a previous stage's output) or --vision DIR --llm DIR (a new student)"
        )
    return global_batch


def loaded(cls, path, **kwargs):
    """cls.from_pretrained(path), or an error naming what did not load."""
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    bad = {k: info.get(k) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise RuntimeError(f"{path}: weights did not load as expected: {bad}")
    return model


def tower_from_llava(path, cfg):
    """The vision tower of a LLaVA checkpoint, reading only its tensors (the LLM stays on disk)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.isfile(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    tower = transformers.AutoModel.from_config(cfg.vision_config)
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
        print(
            f"note: the student's and the teacher's ({path}) chat templates render a conversation "
            f"differently from character {i}: student {s[i : i + 60]!r}, teacher "
            f"{t[i : i + 60]!r}. The teacher reads the student's format in dft: it distils best "
            f"when the student uses the teacher's template."
        )


def read_train_state(path):
    """The step, counts, AdamW state and flags of a checkpoint, as tensors and plain values only: a
    pickled object in a file someone shared could run code here, so weights_only refuses it."""
    try:
        # to the CPU: saved from cuda:0, it would land on cuda:0 on every rank; the optimizer's
        # load_state_dict moves each tensor beside its parameter
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise data.UserError(
            f"--resume: {path} holds more than tensors and plain values, so it is not loaded "
            f"({type(e).__name__}); resume only from checkpoints this program wrote"
        ) from None


# --------------------------------------------------------------------------------------------------
# Saving: stock checkpoints, and what --resume needs.


def save_checkpoint_files(model, processor, out, state_dict=None):
    model.save_pretrained(out, state_dict=state_dict)  # safetensors; FSDP: the gathered state dict
    processor.save_pretrained(out)


def save_checkpoint(model, processor, state, out, state_dict=None):
    """out/checkpoint/: model + processor (stock from_pretrained loads it) + train_state.pt for
    --resume. Written beside it and renamed into place: a crash while saving keeps the last one."""
    final, tmp, old = (
        os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old")
    )
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint_files(model, processor, tmp, state_dict)
    torch.save(state, os.path.join(tmp, "train_state.pt"))
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def publish(out):
    """The stage's output: the last checkpoint's model and processor, loadable from out itself."""
    ckpt = os.path.join(out, "checkpoint")
    for name in os.listdir(ckpt):
        if name != "train_state.pt":
            shutil.copy(os.path.join(ckpt, name), os.path.join(out, name))


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


def load_optimizer(student, opt, state, fsdp):
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(student, opt, state, options=options)
    else:
        opt.load_state_dict(state)


def open_log(out, resume_step=None):
    """out/log.jsonl for writing. On resume, the lines a crash logged after the checkpoint's step
    are dropped, so each step is in the log once."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "log.jsonl")
    kept = []
    if resume_step is not None and os.path.exists(path):
        kept = [line for line in open(path) if json.loads(line)["step"] <= resume_step]
    log = open(path, "w")
    log.writelines(kept)
    return log


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
    """The peak of memory allocated (CUDA) or of the process's resident memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_reserved_bytes(device):
    """CUDA: the peak the caching allocator held (what the device must have); CPU: as peak_bytes."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    return peak_bytes(device)
