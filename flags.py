"""The command line: llava_kd.py's flags, and every error that the flags alone can show (paths,
numbers, combinations), found before anything loads."""

import argparse
import importlib.util
import json
import os

import safetensors

import errors

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
        raise errors.UserError(f"--{flag} {path}: {problem}; expected {what}")
    try:
        kind = json.load(open(config)).get("model_type")
    except (ValueError, AttributeError) as e:
        raise errors.UserError(
            f"--{flag} {config}: not a JSON object ({e}); expected {what}"
        ) from None
    wrong = kind not in kinds if kinds else kind in (None, "llava")
    if wrong:
        raise errors.UserError(f"--{flag} {path}: a {kind!r} checkpoint; expected {what}")
    for name in sorted(os.listdir(path)):  # each file's header (its tensors' places): a torn
        # copy is named here, before anything loads
        if name.endswith(".safetensors"):
            try:
                safetensors.safe_open(os.path.join(path, name), "pt").keys()
            except Exception as e:
                raise errors.UserError(
                    f"--{flag} {path}/{name}: cannot be read ({e}); copy it again"
                ) from None
    has = set(os.listdir(path))
    if kind == "llava" and not {"tokenizer_config.json"} <= has:
        raise errors.UserError(
            f"--{flag} {path}: no tokenizer_config.json, so no processor; save the model's "
            f"processor there too (AutoProcessor.from_pretrained(ITS_ID).save_pretrained(DIR))"
        )
    if kind == "llava" and not has & {"processor_config.json", "preprocessor_config.json"}:
        raise errors.UserError(
            f"--{flag} {path}: no processor_config.json or preprocessor_config.json, so no image "
            f"processor; save the model's processor there too "
            f"(AutoProcessor.from_pretrained(ITS_ID).save_pretrained(DIR))"
        )


def check_sources(paths, folders):
    """--data's files and --images's folders: one folder for all the files, or one each."""
    if len(folders) not in (1, len(paths)):
        raise errors.UserError(
            f"--images: {len(folders)} folders for {len(paths)} --data files; give one folder for "
            f"all of them, or one each in the order of --data"
        )
    if len({os.path.realpath(p) for p in paths}) < len(paths):
        raise errors.UserError(f"--data {' '.join(paths)}: a file given twice")
    for path in paths:
        if not os.path.isfile(path):
            raise errors.UserError(f"--data {path}: no such file; expected a LLaVA JSON file")
    for folder in folders:
        if not os.path.isdir(folder):
            raise errors.UserError(
                f"--images {folder}: no such directory; expected the folder the JSON's image paths "
                f"are relative to"
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
    eval_every=0,
    workers=0,
    alpha=0,
    beta=0,
    gamma=0,
    delta=0,
)
# What --resume may change: everything else must be what the checkpoint was written with. A
# checkpoint holds the whole state (AdamW's by parameter name), so DDP and FSDP2 continue each
# other's; --data is compared by what the file holds (data_sha256), not where it is.


def check_flags(a, world, stage, table):
    """Every user error that the flags alone can show; returns the global batch."""
    if (a.plan_gpus is None) != (a.plan_gib is None):
        raise errors.UserError("--plan_gpus N and --plan_gib G come together (the device's GiB)")
    if a.plan_gpus:  # the plan of another machine: no data read, no torchrun
        pass
    elif not a.data or not a.images:
        raise errors.UserError("--data JSON and --images DIR are needed (--plan_gpus: not)")
    else:
        check_sources(a.data, a.images)
    if a.eval_data and not os.path.isfile(a.eval_data):
        raise errors.UserError(
            f"--eval_data {a.eval_data}: no such file; expected a LLaVA JSON file"
        )
    if a.eval_images and not os.path.isdir(a.eval_images):
        raise errors.UserError(f"--eval_images {a.eval_images}: no such directory")
    if (a.eval_every or a.eval_images) and not a.eval_data:
        raise errors.UserError("--eval_every and --eval_images come with --eval_data JSON")
    if a.report_to == "tensorboard" and not importlib.util.find_spec("tensorboard"):
        raise errors.UserError(
            "--report_to tensorboard needs the tensorboard package: pip install tensorboard"
        )
    for flag, (kinds, what) in CHECKPOINT_FLAGS.items():
        if getattr(a, flag):
            check_checkpoint(flag, getattr(a, flag), kinds, what)
    for flag, low in NUMERIC_FLAGS.items():
        value = getattr(a, flag)
        if value is not None and value < low:
            raise errors.UserError(f"--{flag} {value}: must be at least {low}")
    if a.attn_implementation == "flash_attention_2" and not importlib.util.find_spec("flash_attn"):
        raise errors.UserError(
            "--attn_implementation flash_attention_2 needs the flash-attn package (pip install "
            "flash-attn, on a CUDA machine); sdpa needs nothing"
        )
    if a.lr is not None and a.lr <= 0:
        raise errors.UserError(f"--lr {a.lr}: must be above 0 (leave it out for Table A9's)")
    global_batch = table["global_batch"] if a.global_batch_size is None else a.global_batch_size
    if global_batch % (a.batch_size * world):
        raise errors.UserError(
            f"--global_batch_size {global_batch} must be a multiple of --batch_size "
            f"{a.batch_size} x {world} processes"
        )
    if stage["teacher"] != bool(a.teacher):
        need = "needs --teacher DIR" if stage["teacher"] else "takes no --teacher"
        raise errors.UserError(f"--stage {a.stage} {need}")
    for flag in ("init", "teacher"):
        path = getattr(a, flag)
        if path and os.path.realpath(path) == os.path.realpath(a.out):
            raise errors.UserError(
                f"--{flag} and --out are both {a.out}: give the stage a new --out"
            )
    if a.fsdp and "RANK" not in os.environ and not a.plan_gpus:
        raise errors.UserError(
            "--fsdp shards the student over processes: start it with torchrun (train.sh: FSDP=1)"
        )
    if not (a.resume or a.init or (a.vision and a.llm)):
        raise errors.UserError(
            "give --init DIR (a previous stage's output) or --vision DIR --llm DIR (a new student)"
        )
    return global_batch


def parser(description, stages):
    """llava_kd.py's command line: `train` and its flags, `plot`."""
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
    p.add_argument(
        "--data", nargs="+", help="LLaVA JSON file(s): one epoch order over all their samples"
    )
    p.add_argument(
        "--images",
        nargs="+",
        help="the folder each file's image paths are relative to: one for all, or one each",
    )
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
    p.add_argument("--eval_data", help="held-out LLaVA JSON: the stage's losses on it, no grad")
    p.add_argument("--eval_images", help="its image folder (default: the first --images)")
    p.add_argument(
        "--eval_every", type=int, help="with --eval_data: every N steps, and at the end (default)"
    )
    p.add_argument(
        "--report_to",
        choices=["tensorboard"],
        help="also write every log.jsonl record as TensorBoard scalars, in --out/tensorboard",
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
    p = sub.add_parser(
        "plot",
        help="the curves of stages' log.jsonl as a PNG",
        description="Each quantity of log.jsonl against the step, a panel each, the stages "
        "one after another (e.g. a recipe's dpt, sft and dft --out).",
    )
    p.add_argument("outs", nargs="+", metavar="OUT", help="a stage's --out (it holds log.jsonl)")
    p.add_argument("--out", default="curves.png", help="the PNG to write")
    return ap
