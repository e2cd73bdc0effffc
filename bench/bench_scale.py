"""Peak memory and seconds a step of each stage at the paper's widths, through `llava_kd.py train`.

    python -m bench.bench_scale [--layers 2] [--batch 2] [--steps 2] [--stages sft dpt dft]
    python -m bench.bench_scale --plan_table  # the memory plan of the real recipe's stages
    python -m bench.bench_scale --stages dft --nproc 2 [--fsdp]  # DDP or FSDP2, 2 processes
    python -m bench.bench_scale --student 1.8b ...  # LLaVA-KD-2B's student: Qwen1.5-1.8B

Models are built from configs with the real widths and vocabulary (nothing downloaded; random
weights, depth cut to --layers): vision SigLIP-so400m-patch14-384 (1152 wide, 384px, 729 visual
tokens), teacher LLM Qwen1.5-4B (2560 wide, untied head), student LLM Qwen1.5-0.5B (1024 wide, tied)
or --student 1.8b: Qwen1.5-1.8B (2048 wide, untied), vocabulary 151936 with Qwen's special ids. Each
sample: one 384px image and ~750 text tokens (~1,500 tokens). Peak memory is the training process's
peak RSS on a CPU (float32) and torch.cuda.max_memory_allocated on a GPU (bf16 autocast, teacher in
bf16), as `llava_kd.py train` logs it, with the student's trained parameters + gradients + AdamW
state held by one process (trained_gib: its shards under FSDP), beside the total the run's memory
plan printed, each with and without --grad_checkpointing (--checkpointing). The check printed last:
peak(dft) <= peak(sft) + the teacher's parameter bytes + 0.25 x the student's float32 logits of one
micro-batch.
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

import torch
import transformers
from PIL import Image

import checkpoints
import llava_kd
import memory
import models
import toy

VISION = dict(
    image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_attention_heads=16
)
TEACHER_LLM = dict(
    hidden_size=2560,
    intermediate_size=6912,
    num_attention_heads=20,
    num_key_value_heads=20,
    tie_word_embeddings=False,
)
STUDENT_LLMS = {
    "0.5b": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=True,
    ),
    "1.8b": dict(
        hidden_size=2048,
        intermediate_size=5504,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    ),
}
V = 151936


def setup(d, layers, n_samples, text_tokens, student="0.5b"):
    """Checkpoints and data in d: vision/, student_llm/, teacher/ (a LLaVA), student/ (a LLaVA),
    data.json, images/."""
    words = (
        [w for c in toy.COLOURS for w in (c,)]
        + list(toy.SHAPES)
        + list(toy.SIZES)
        + ["the", "and", "is", "in"]
    )
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(200)]
    tok = toy.real_ids_tokenizer(
        texts,
        151643,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=toy.CHATML,
    )
    torch.manual_seed(0)
    transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(num_hidden_layers=layers, **VISION)
    ).save_pretrained(f"{d}/vision")
    transformers.SiglipImageProcessorPil(size={"height": 384, "width": 384}).save_pretrained(
        f"{d}/vision"
    )
    for name, c in (("teacher_llm", TEACHER_LLM), ("student_llm", STUDENT_LLMS[student])):
        cfg = transformers.Qwen2Config(
            vocab_size=V,
            num_hidden_layers=layers,
            max_position_embeddings=4096,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **c,
        )
        transformers.Qwen2ForCausalLM(cfg).save_pretrained(f"{d}/{name}")
        tok.save_pretrained(f"{d}/{name}")
    for name, llm in (("teacher", "teacher_llm"), ("student", "student_llm")):
        checkpoints.save_checkpoint_files(
            *models.build_student(f"{d}/vision", f"{d}/{llm}"), f"{d}/{name}"
        )
    write_data(d, n_samples, text_tokens, words, rng)
    return sum(
        p.numel() * 2
        if torch.cuda.is_available()
        else p.numel() * 4  # the teacher in bf16 on a GPU
        for p in transformers.LlavaForConditionalGeneration.from_pretrained(
            f"{d}/teacher"
        ).parameters()
    )


def write_data(d, n_samples, text_tokens, words, rng):
    """d/data.json: n_samples of one 384 px image (d/images/) and an answer of text_tokens words."""
    os.makedirs(f"{d}/images", exist_ok=True)
    rows = []
    for i in range(n_samples):
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (384, 384), colour).save(f"{d}/images/{i}.png")
        answer = " ".join(rng.choice(words) for _ in range(text_tokens))  # about one token a word
        turns = [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": answer},
        ]
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    json.dump(rows, open(f"{d}/data.json", "w"))


FULL_DEPTH = {"vision": 27, "teacher": 40, "0.5b": 24, "1.8b": 24}  # SigLIP, Qwen1.5-4B/0.5B/1.8B


def meta_llava(llm):
    """The paper's LLaVA at full depth on the meta device: shapes only."""
    widths = TEACHER_LLM if llm == "teacher" else STUDENT_LLMS[llm]
    text = transformers.Qwen2Config(vocab_size=V, num_hidden_layers=FULL_DEPTH[llm], **widths)
    vision = transformers.SiglipVisionConfig(num_hidden_layers=FULL_DEPTH["vision"], **VISION)
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, tie_word_embeddings=text.tie_word_embeddings
    )
    with torch.device("meta"):
        return transformers.LlavaForConditionalGeneration(cfg)


def plan_table(batch, max_length, world):
    """The memory plan of every stage of the real recipe on `world` GPUs (bf16): a README table."""
    runs = [
        ("teacher PT", "teacher", "pt"),
        ("teacher SFT", "teacher", "sft"),
        ("student 0.5B DPT", "0.5b", "dpt"),
        ("student 0.5B SFT", "0.5b", "sft"),
        ("student 0.5B DFT", "0.5b", "dft"),
        ("student 1.8B DFT", "1.8b", "dft"),
    ]
    print(
        f"GiB a GPU by the memory plan: micro-batch {batch} x {max_length} tokens, bf16, "
        f"{world} GPUs, teacher Qwen1.5-4B, SigLIP-so400m"
    )
    print("| stage | DDP | DDP, checkpointing | FSDP2 | FSDP2, checkpointing |")
    print("| --- | --- | --- | --- | --- |")
    for name, llm, stage in runs:
        student = meta_llava(llm)
        llava_kd.apply_stage(student, stage)
        teacher = meta_llava("teacher") if llava_kd.STAGES[stage]["teacher"] else None
        cells = []
        for fsdp in (False, True):
            accum = 128 // (batch * world)  # Table A9's global batch of sft/dft
            plan = (batch, max_length, world, True, fsdp, 0.5, world, accum)
            rows = memory.memory_plan(student, teacher, *plan)
            cells += [memory.plan_total(rows, c, cuda=True) / 2**30 for c in (False, True)]
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


def run(d, stage, batch, steps, nproc=1, fsdp=False, checkpointing=True):
    extra = {
        "sft": ["--init", f"{d}/student"],
        "dft": ["--init", f"{d}/student", "--teacher", f"{d}/teacher"],
        "dpt": ["--init", f"{d}/student", "--teacher", f"{d}/teacher"],
        "pt": ["--init", f"{d}/student"],
    }[stage]
    out = f"{d}/out-{stage}"
    launch = [sys.executable] + (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else []
    )
    flags = f"--stage {stage} --data {d}/data.json --images {d}/images --out {out} --workers 0"
    flags += f" --batch_size {batch} --global_batch_size {batch * nproc} --max_steps {steps}"
    flags += " --max_length 2048 --save_every 0"
    flags += " --grad_checkpointing" * checkpointing + " --fsdp" * fsdp
    cmd = [*launch, "llava_kd.py", "train", *flags.split(), *extra]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
    shutil.rmtree(out, ignore_errors=True)
    printed = subprocess.run(cmd, check=True, cwd=here, capture_output=True, text=True).stdout
    plan = re.search(r"plan: ([0-9.]+) GiB", printed)
    log = [json.loads(line) for line in open(f"{out}/log.jsonl")]
    return (
        float(plan[1]) if plan else float("nan"),
        max(r["peak_gib"] for r in log),
        min(r["seconds"] for r in log),
        log[-1]["tokens_per_s"],
        log[-1]["trained_gib"],
    )


def arguments():
    """The command line."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--layers", type=int, default=2, help="layers of each model (the widths are the real ones)"
    )
    ap.add_argument("--batch", type=int, default=2, help="samples per micro-batch")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--text_tokens", type=int, default=750)
    ap.add_argument("--stages", nargs="+", default=["sft", "dpt", "dft"])
    ap.add_argument("--dir", help="keep the checkpoints here (default: a temporary directory)")
    ap.add_argument(
        "--nproc", type=int, default=1, help="processes (torchrun); peak memory is rank 0's"
    )
    ap.add_argument(
        "--fsdp", action="store_true", help="shard the student with FSDP2 instead of DDP"
    )
    ap.add_argument(
        "--checkpointing",
        choices=["on", "off", "both"],
        default="both",
        help="--grad_checkpointing in the runs (both: each stage twice)",
    )
    ap.add_argument(
        "--student", choices=STUDENT_LLMS, default="0.5b", help="the student LLM's widths"
    )
    ap.add_argument(
        "--plan_table",
        action="store_true",
        help="print the plan of the real recipe's stages at full depth (no run) and stop",
    )
    return ap


def main():
    a = arguments().parse_args()
    if a.plan_table:
        for max_length in (1024, 2048):
            plan_table(8, max_length, 8)
        return
    tmp = None if a.dir else tempfile.TemporaryDirectory()  # ~17 GB of checkpoints: removed at exit
    d = a.dir or tmp.name
    teacher_bytes = setup(d, a.layers, a.batch * a.nproc, a.text_tokens, a.student)
    tokens = 729 + a.text_tokens + 20
    logits = a.batch * tokens * V * 4
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"{device}; student {a.student}; {a.layers} layers each; batch {a.batch} x ~{tokens} "
        f"tokens; vocabulary {V}; "
        f"teacher parameters {teacher_bytes / 2**30:.2f} GiB; "
        f"student float32 logits of the micro-batch {logits / 2**30:.2f} GiB; "
        f"{a.nproc} process(es), {'FSDP2' if a.fsdp else 'DDP' if a.nproc > 1 else 'no wrapper'}"
    )
    peak = {}
    for stage in a.stages:
        for checkpointing in {"on": [True], "off": [False], "both": [True, False]}[a.checkpointing]:
            plan, measured, seconds, tps, trained = run(
                d, stage, a.batch, a.steps, a.nproc, a.fsdp, checkpointing
            )
            peak.setdefault(stage, measured)  # the check below: checkpointed, where measured
            print(
                f"{stage:4s} checkpointing {'on ' if checkpointing else 'off'}  peak "
                f"{measured:6.2f} GiB  plan {plan:6.2f} GiB ({plan / measured - 1:+.0%})  "
                f"{seconds:7.1f} s/step  {tps:6.0f} tokens/s  trained parameters + gradients "
                f"+ AdamW state {trained:6.2f} GiB a process",
                flush=True,
            )
    if "sft" in peak and "dft" in peak:
        budget = peak["sft"] + (teacher_bytes + 0.25 * logits) / 2**30
        print(
            f"dft - sft = {peak['dft'] - peak['sft']:.2f} GiB = teacher parameters + "
            f"{(peak['dft'] - peak['sft'] - teacher_bytes / 2**30) * 2**30 / logits:.2f} x the "
            f"student's float32 "
            f"logits (target <= 0.25: peak(dft) <= {budget:.2f} GiB) "
            f"-> {'met' if peak['dft'] <= budget else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
