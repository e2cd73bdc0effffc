"""A recipe that runs for days: a finished stage is skipped and keeps only what a user needs, a
changed setting is refused by name, notes come once with every process's counts, samples too long
can be left out, the plan of another machine, and a failed stage's error line last (train.sh)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, finish, processes, refused, sft

import checkpoints
import llava_kd
import memory
import models


def test_a_finished_stage_is_skipped_and_keeps_only_its_model_processor_and_log(
    toy, ckpts, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = sft(toy, ckpts, out, "--auto_resume")
    llava_kd.main(argv)  # 6 steps: its whole schedule
    kept = sorted(os.listdir(out))
    assert "log.jsonl" in kept and checkpoints.DONE in kept and "model.safetensors" in kept
    assert not set(kept) & set(checkpoints.CHECKPOINTS)  # its AdamW state is gone
    model = out / "model.safetensors"
    assert os.stat(model).st_nlink == 1  # the checkpoint's file, linked and then unlinked
    loaded = models.load_llava(str(out))  # the processor with it
    assert loaded[1].tokenizer is not None
    before = os.stat(model).st_mtime_ns
    capsys.readouterr()
    llava_kd.main(argv)
    assert f"stage sft: finished in {out} (step 6): skipped" in capsys.readouterr().out
    assert os.stat(model).st_mtime_ns == before  # not trained again
    lr = argv.index("--lr") + 1
    changed = argv[:lr] + ["2e-3"] + argv[lr + 1 :]
    message = refused(changed)
    assert message.startswith(f"error: {out}/{checkpoints.DONE}: the stage finished in {out} was ")
    assert "--lr 0.001 (now 0.002)" in message
    without = [x for x in argv if x != "--auto_resume"]
    assert "holds another run" in refused(without)
    assert "the stage finished (done.json)" in refused(without + ["--resume"])
    assert os.stat(model).st_mtime_ns == before


def test_a_stage_stopped_by_max_steps_keeps_its_checkpoint_and_goes_on(toy, ckpts, tmp_path):
    out = tmp_path / "out"
    argv = sft(toy, ckpts, out, "--auto_resume", "--max_steps", "2")
    llava_kd.main(argv)
    assert json.load(open(out / "checkpoint" / "complete.json"))["step"] == 2
    llava_kd.main(argv[:-1] + ["4"])  # resumed: steps 3 and 4
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == [1, 2, 3, 4]
    assert json.load(open(out / checkpoints.DONE))["step"] == 4


def test_notes_come_once_with_every_processs_count_and_too_long_samples_can_be_left_out(
    toy, ckpts, tmp_path
):
    rows = json.load(open(f"{toy}/data/sft.json"))
    long_prompt = [
        {"from": "human", "value": "<image>\n" + "red " * 3000},
        {"from": "gpt", "value": "x"},
    ]
    long_answer = [
        {"from": "human", "value": "<image>\nQ?"},
        {"from": "gpt", "value": "red " * 3000},
    ]
    for i in range(3):  # samples 0, 1, 2: on both processes' shares
        rows[i]["conversations"] = long_prompt
    for i in (3, 4):
        rows[i]["conversations"] = long_answer
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    argv = sft(toy, ckpts, tmp_path / "out", "--max_steps", "1")
    argv[argv.index("--data") + 1] = str(path)
    outs = finish(processes(*argv, "--drop_too_long"))
    notes = [line for line in outs[0].splitlines() if line.startswith("note: ")]
    ids = [rows[i]["id"] for i in range(3)]

    def shown(*i):  # in rank order: rank 0 checks samples 0, 2, 4, ..., rank 1 samples 1, 3, ...
        return ", ".join(rows[j]["id"] for j in sorted(i, key=lambda j: (j % 2, j)))

    assert notes == [
        f"note: {path}: 3 sample(s) have no answer token within --max_length 2048: left out "
        f"(--drop_too_long), e.g. {shown(0, 1, 2)}",
        f"note: {path}: 2 answer(s) cut short by --max_length 2048 (their end token is not "
        f"trained), e.g. {shown(3, 4)}",
    ], outs[0]
    assert "note: " not in outs[1]
    assert json.load(open(tmp_path / "out" / "left_out.json")) == ids
    assert f"stage sft: {len(rows) - 3} samples" in outs[0]
    argv[argv.index("--out") + 1] = str(tmp_path / "refused")
    message = refused(argv)  # the default: refused, by id, pointing at the flag
    assert message.startswith(f"error: {path}: 3 sample(s) have no answer token within --max_")
    assert message.endswith("--drop_too_long")


def test_the_plan_of_a_named_machine_needs_neither_its_gpus_nor_the_data(
    ckpts,
    tmp_path,
    capsys,
    no_weights,  # noqa: F811
):
    student, teacher = str(ckpts / "student"), str(ckpts / "teacher")
    argv = ["train", "--stage", "dft", "--out", str(tmp_path / "o"), "--init", student]
    argv += ["--teacher", teacher, "--global_batch_size", "64", "--plan_gpus", "8"]
    llava_kd.main(argv + ["--plan_gib", "80"])
    printed = capsys.readouterr().out
    assert "bf16 autocast; 8 process(es)" in printed
    s, t = memory.meta_llava(student), memory.meta_llava(teacher)
    llava_kd.apply_stage(s, "dft")
    # 8 processes of one node, CUDA, DDP, accumulation 64 / (4 x 8)
    rows = memory.memory_plan(s, t, 4, 2048, 8, True, False, 0.5, 8, 2)
    total = memory.plan_total(rows, False, cuda=True)
    assert f"plan: {total / 2**30:.2f} GiB a process (DDP, checkpointing off) of 80.0" in printed
    assert not os.path.exists(tmp_path / "o")
    message = refused(argv + ["--plan_gib", "0.001"])
    assert "exceeds the 0.0 GiB of the device" in message
    assert refused(argv) == (
        "error: --plan_gpus N and --plan_gib G come together (the device's GiB)"
    )


def test_a_failed_stage_ends_train_sh_with_its_error_line_and_no_traceback(toy, ckpts, tmp_path):
    env = dict(
        os.environ,
        INIT=str(ckpts / "student"),
        TEACHER=str(ckpts / "teacher"),
        SFT_DATA=f"{toy}/data/sft.json",
        SFT_IMAGES=f"{toy}/data/images",
        OUT=str(tmp_path),
        NGPU="2",  # through torchrun
        EXTRA="--workers 0 --lr -1",
        PYTHON=sys.executable,
    )
    done = subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    log = tmp_path / "logs" / "student-dft.log"
    assert done.stderr.splitlines()[-1] == (
        f"error: stage dft --out {tmp_path}/student-dft: --lr -1.0: must be above 0 (leave it "
        f"out for Table A9's) (exit 1; whole output: {log})"
    )
    assert "Traceback" not in output and "ChildFailedError" not in output
    assert "error: --lr -1.0" in log.read_text()


@pytest.mark.parametrize("signum", [9, 11])
def test_the_launcher_names_a_process_that_died_without_a_line(tmp_path, signum):
    script = tmp_path / "die.py"
    script.write_text(
        f"import os, signal\nif os.environ['RANK'] == '1':\n    os.kill(os.getpid(), {signum})\n"
    )
    argv = [sys.executable, "processes.py", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 128 + signum
    name = "SIGKILL" if signum == 9 else "SIGSEGV"
    assert done.stderr.splitlines()[-1] == f"error: process 1 of the stage ended with signal {name}"
    assert "Traceback" not in done.stderr


def test_the_same_data_at_another_path_continues_and_other_data_is_refused(toy, ckpts, tmp_path):
    """Jobs that stage their data to a scratch folder: the checkpoint goes on with the file that
    holds the same samples wherever it is; a file that holds others (as many) is refused by name."""
    out = tmp_path / "out"
    llava_kd.main(sft(toy, ckpts, out, "--auto_resume", "--max_steps", "1"))
    moved = tmp_path / "scratch" / "sft.json"
    moved.parent.mkdir()
    moved.write_bytes(open(f"{toy}/data/sft.json", "rb").read())
    for resume in ("--auto_resume", "--resume"):
        argv = sft(toy, ckpts, out, resume, "--max_steps", "2" if resume == "--resume" else "3")
        argv[argv.index("--data") + 1] = str(moved)
        llava_kd.main(argv)
    rows = json.load(open(moved))
    rows[0]["conversations"][1]["value"] += " (edited)"
    moved.write_text(json.dumps(rows))
    for resume, what in [
        ("--resume", f"--resume: the checkpoint in {out}"),
        ("--auto_resume", f"{out}/{checkpoints.DONE}: the stage finished in {out}"),
    ]:
        argv = sft(toy, ckpts, out, resume, "--max_steps", "3")
        argv[argv.index("--data") + 1] = str(moved)
        assert refused(argv) == (
            f"error: {what} was written on other data: --data {moved} does not hold the samples "
            f"it trained on (then at {moved}); continue on those, or give a new --out"
        )


@pytest.mark.parametrize(
    "marker", [checkpoints.DONE, f"checkpoint/{checkpoints.COMPLETE}", "log.jsonl"]
)
@pytest.mark.parametrize("damage", ["empty", "torn", "a list"])
def test_a_torn_marker_is_named_or_set_right_by_the_same_command(
    toy, ckpts, tmp_path, marker, damage
):
    """Each file a stop can tear: done.json (the checkpoint is published again), complete.json (that
    checkpoint is not taken: the one named), the log (its torn line dropped); never a traceback."""
    out = tmp_path / "out"
    argv = sft(toy, ckpts, out, "--auto_resume", "--max_steps", "2", "--save_every", "1")
    llava_kd.main(argv)
    path = out / marker
    text = {"empty": "", "torn": path.read_text()[:9], "a list": "[1, 2]"}[damage]
    path.write_text(text)
    if marker == f"checkpoint/{checkpoints.COMPLETE}":
        os.remove(out / checkpoints.DONE)  # so the checkpoint is read
        message = refused(argv[:-3] + ["3"])
        assert "holds another run (config.json, log.jsonl, checkpoint; " in message
        assert f"{path}: cut short or damaged (" in message
        return
    llava_kd.main(argv)
    assert json.load(open(out / checkpoints.DONE))["step"] == 2
    steps = [json.loads(x)["step"] for x in open(out / "log.jsonl") if x.strip().endswith("}")]
    assert steps in ([1, 2], []) if marker == "log.jsonl" else steps == [1, 2]
