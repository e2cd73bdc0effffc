"""Cost of distillation per training step, on the toy models and one fixed batch.

python -m bench.bench_step [--toy DIR] [--repeat 7] [--batch 16]

ratio = time(dft step) / (time(sft step) + time(teacher forward)). 1.0 would mean distillation costs
exactly one teacher forward; above it is the price of the losses, below it what sharing Z_v saves.
"""

import argparse
import statistics
import tempfile
import time

import torch

import data
import llava_kd
import models
import toy as toy_setup


def timed(runs, repeat):
    """Each run's seconds, `repeat` times after a warm-up, interleaved so that machine noise hits
    them alike."""
    times = {k: [] for k in runs}
    for f in runs.values():
        f()
    for _ in range(repeat):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--toy", help="a toy setup dir (default: write one to a temporary dir)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    toy = a.toy or tempfile.mkdtemp()
    if not a.toy:
        toy_setup.make_toy(toy)
    torch.manual_seed(0)
    teacher, t_proc = models.build_student(f"{toy}/vision", f"{toy}/teacher_llm")
    teacher.eval().requires_grad_(False)
    model, proc = models.build_student(f"{toy}/vision", f"{toy}/student_llm")
    model.model.vision_tower = teacher.model.vision_tower
    llava_kd.apply_stage(model, "dft")
    ds = data.LlavaDataset(
        f"{toy}/data/sft.json", f"{toy}/data/images", proc, chat=True, max_length=512
    )
    b = data.collate([ds[i] for i in range(a.batch)], proc.tokenizer.pad_token_id)
    student = llava_kd.Student(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(t):
        loss, _ = llava_kd.stage_loss(student, model, t, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def teacher_forward():
        z_v = llava_kd.vision_features(teacher, b["pixel_values"])
        llava_kd.llava_logits(teacher, b["input_ids"], b["attention_mask"], z_v)

    runs = {
        "sft step": lambda: step(None),
        "teacher forward": teacher_forward,
        "dft step": lambda: step(teacher),
    }
    times = timed(runs, a.repeat)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = int(b["attention_mask"].sum())
    for k, v in med.items():
        print(f"{k:16s} median {1000 * v:7.1f} ms  ({tokens} tokens, {a.repeat} runs)")
    ratios = [
        d / (s + t)
        for s, t, d in zip(times["sft step"], times["teacher forward"], times["dft step"])
    ]
    print(
        f"dft / (sft + teacher "
        f"forward): {med['dft step'] / (med['sft step'] + med['teacher forward']):.3f} "
        f"(per-run ratios: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
        f"max {max(ratios):.3f}) "
        f"on {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
