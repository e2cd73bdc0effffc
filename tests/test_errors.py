"""User errors fail fast and by name: before any weights load, one line, no traceback, once."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import ROOT, args, changed, ended, processes, weights

import errors
import llava_kd
import toy as toy_module


@pytest.fixture(scope="module")
def student_dir(ckpts):  # conftest.py's untrained student
    return str(ckpts / "student")


def replace(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


WRONG = [  # (flag, value, the one line's content)
    (
        "--data",
        "/nonexistent.json",
        "--data /nonexistent.json: no such file; expected a LLaVA JSON file",
    ),
    ("--images", "/nonexistent", "--images /nonexistent: no such directory; expected the folder"),
    (
        "--init",
        "/tmp/nonexist",
        "--init /tmp/nonexist: no such directory; expected a LLaVA checkpoint directory",
    ),
    (
        "--teacher",
        "/tmp/nonexist",
        "--teacher /tmp/nonexist: no such directory; expected a LLaVA checkpoint directory",
    ),
    (
        "--teacher",
        "{toy}/student_llm",
        "--teacher {toy}/student_llm: a 'qwen2' checkpoint; expected a LLaVA checkpoint",
    ),
    (
        "--init",
        "{toy}/data",
        "--init {toy}/data: no config.json in this directory; expected a LLaVA checkpoint",
    ),
    (
        "--vision",
        "{toy}/student_llm",
        "--vision {toy}/student_llm: a 'qwen2' checkpoint; expected a SigLIP or CLIP",
    ),
    (
        "--llm",
        "{student}",
        "--llm {student}: a 'llava' checkpoint; expected a causal-LM checkpoint directory",
    ),
    (
        "--llm",
        "/tmp/nonexist",
        "--llm /tmp/nonexist: no such directory; expected a causal-LM checkpoint directory",
    ),
]


@pytest.mark.parametrize("flag,value,line", WRONG, ids=[f"{f} {v}" for f, v, _ in WRONG])
def test_a_wrong_path_flag_is_one_line_naming_it_before_any_weights_load(
    toy, student_dir, tmp_path, no_weights, flag, value, line
):

    def fill(x):
        return x.format(toy=toy, student=student_dir)

    argv = args(toy, "dft", tmp_path) + ["--init", student_dir, "--teacher", student_dir]
    if flag in ("--vision", "--llm"):  # a new student: --vision and --llm instead of --init
        argv = args(toy, "dpt", tmp_path) + [
            "--teacher",
            student_dir,
            "--vision",
            f"{toy}/vision",
            "--llm",
            f"{toy}/student_llm",
        ]
    with pytest.raises(SystemExit) as e:
        llava_kd.main(replace(argv, flag, fill(value)))
    assert str(e.value).startswith("error: " + fill(line))
    assert "\n" not in str(e.value)


def test_missing_flags_are_named(toy, student_dir, tmp_path, no_weights):
    with pytest.raises(SystemExit, match="^error: --stage dft needs --teacher DIR$"):
        llava_kd.main(args(toy, "dft", tmp_path) + ["--init", student_dir])
    with pytest.raises(SystemExit, match="^error: give --init DIR .* or --vision DIR --llm DIR"):
        llava_kd.main(args(toy, "pt", tmp_path) + ["--vision", f"{toy}/vision"])


def test_a_teacher_where_none_is_taken_and_too_few_samples_are_named(
    toy, student_dir, tmp_path, no_weights
):
    with pytest.raises(SystemExit, match="^error: --stage sft takes no --teacher$"):
        llava_kd.main(
            args(toy, "sft", tmp_path) + ["--init", student_dir, "--teacher", student_dir]
        )
    argv = replace(
        args(toy, "sft", tmp_path) + ["--init", student_dir], "--global_batch_size", "128"
    )
    argv = replace(argv, "--batch_size", "64")
    with pytest.raises(
        SystemExit,
        match=r"^error: .*sft.json: 100 samples are fewer than one global batch \(128\); "
        r"lower --global_batch_size$",
    ):
        llava_kd.main(argv)


def test_bad_data_is_reported_before_any_weights_load(toy, student_dir, tmp_path, no_weights):
    rows = json.load(open(f"{toy}/data/sft.json"))
    rows[3]["conversations"] = rows[3]["conversations"][:1]  # a question with no answer
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    argv = replace(
        args(toy, "dft", tmp_path / "out") + ["--init", student_dir, "--teacher", student_dir],
        "--data",
        str(tmp_path / "bad.json"),
    )
    with pytest.raises(
        SystemExit,
        match=f"^error: {tmp_path}/bad.json: sample {rows[3]['id']}: turns must alternate",
    ):
        llava_kd.main(argv)


def test_the_command_line_prints_one_line_and_no_traceback_once_per_run(toy, student_dir, tmp_path):
    """`python llava_kd.py`: the one line on stderr, exit 1; of 2 processes, rank 0 says it."""
    argv = args(toy, "dft", tmp_path) + ["--init", student_dir, "--teacher", "/tmp/nonexist"]
    one = subprocess.run(
        [sys.executable, "llava_kd.py", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = (
        "error: --teacher /tmp/nonexist: no such directory; expected a LLaVA checkpoint directory\n"
    )
    assert one.returncode == 1 and one.stderr == line and "Traceback" not in one.stdout + one.stderr
    two = processes(*replace(argv, "--batch_size", "4"))
    assert ended(two) == [line, ""] and [p.returncode for p in two] == [1, 1]


def test_a_crashed_run_resumed_ends_as_an_uninterrupted_one_and_logs_each_step_once(
    toy, student_dir, tmp_path
):
    """Stopped at the checkpoint of step 2 after logging step 3, then resumed: the weights of an
    uninterrupted run, each step logged once. Resuming with another --seed is refused."""
    common = ["--init", student_dir, "--lr", "1e-3", "--save_every", "2", "--teacher", student_dir]
    llava_kd.main(args(toy, "dft", tmp_path / "whole") + common + ["--max_steps", "4"])
    whole = [json.loads(line) for line in open(tmp_path / "whole" / "log.jsonl")]
    llava_kd.main(args(toy, "dft", tmp_path / "crash") + common + ["--max_steps", "2"])
    # the crashed run got to log step 3, not to save it
    with open(tmp_path / "crash" / "log.jsonl", "a") as f:
        f.write(json.dumps(dict(whole[2], loss=123.0)) + "\n")
    llava_kd.main(args(toy, "dft", tmp_path / "crash") + common + ["--max_steps", "4", "--resume"])
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "crash")
    assert changed(a, weights(student_dir))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7, msg=k)
    resumed = [json.loads(line) for line in open(tmp_path / "crash" / "log.jsonl")]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for r, s in zip(whole, resumed):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-6)
    argv = args(toy, "dft", tmp_path / "crash") + common + ["--seed", "1", "--resume"]
    with pytest.raises(SystemExit, match=r"was written with --seed 0 \(now 1\)"):
        llava_kd.main(argv)


def test_the_no_weights_guard_catches_the_loads_training_makes(
    toy, student_dir, tmp_path, no_weights
):
    """The guard above is what makes "before any weights load" true: valid flags get past the checks
    to the first load, through the same calls training makes for a new student and for --init."""
    with pytest.raises(AssertionError, match="weights were loaded"):
        llava_kd.main(args(toy, "sft", tmp_path) + ["--init", student_dir])
    with pytest.raises(AssertionError, match="weights were loaded"):
        llava_kd.main(
            args(toy, "pt", tmp_path) + ["--vision", f"{toy}/vision", "--llm", f"{toy}/student_llm"]
        )


# SystemExit(str): Python prints it as one line and exits 1
def test_toy_eval_names_a_wrong_model_dir():
    with pytest.raises(SystemExit) as e:
        toy_module.main(["eval", "--model", "/tmp/nonexist", "--data", "x", "--images", "y"])
    assert str(e.value).startswith(
        "error: --model /tmp/nonexist: no such directory"
    ) and "\n" not in str(e.value)


def damaged(student_dir, tmp_path, damage):
    """A copy of the student checkpoint with one fault."""
    import shutil

    path = tmp_path / damage
    shutil.copytree(student_dir, path)
    if damage == "torn":  # a copy cut short
        size = os.path.getsize(path / "model.safetensors")
        os.truncate(path / "model.safetensors", size // 2)
    elif damage == "config":
        (path / "config.json").write_text('{"model_type": "llava",')
    else:  # the model alone, as some hub repositories and hand copies have it
        for name in os.listdir(path):
            if name not in ("config.json", "generation_config.json", "model.safetensors"):
                os.remove(path / name)
    return str(path)


FAULTS = {
    "torn": "{d}/model.safetensors: cannot be read (",
    "config": "{d}/config.json: not a JSON object (",
    "no_processor": "{d}: no tokenizer_config.json, so no processor; save the model's processor",
}


@pytest.mark.parametrize("flag", ["--init", "--teacher"])
@pytest.mark.parametrize("damage", FAULTS)
def test_a_damaged_checkpoint_is_one_line_naming_its_file_before_any_weights_load(
    toy, student_dir, tmp_path, no_weights, flag, damage
):
    d = damaged(student_dir, tmp_path, damage)
    argv = args(toy, "dft", tmp_path / "out") + ["--init", student_dir, "--teacher", student_dir]
    with pytest.raises(SystemExit) as e:
        llava_kd.main(replace(argv, flag, d))
    message = str(e.value)
    assert message.startswith(f"error: {flag} " + FAULTS[damage].format(d=d)), message
    assert "\n" not in message


def test_an_out_that_cannot_be_written_is_one_line(toy, student_dir, tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "makedirs", read_only)  # as root, chmod would not stop the test
    argv = args(toy, "dft", tmp_path / "out") + ["--init", student_dir, "--teacher", student_dir]
    with pytest.raises(SystemExit) as e:
        llava_kd.main(argv)
    assert str(e.value) == (
        f"error: --out {tmp_path}/out: cannot be written (PermissionError: Permission denied); "
        f"give an --out this process can write"
    )


def test_json_with_a_byte_order_mark_and_json_lines_are_the_same_samples(toy, tmp_path):
    import data

    source = f"{toy}/data/sft.json"
    rows = json.load(open(source))
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + open(source, "rb").read())
    lines = tmp_path / "data.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    want = data.read_samples(source, f"{toy}/data/images")
    for path in (bom, lines):
        assert data.read_samples(str(path), f"{toy}/data/images") == want
    broken = tmp_path / "broken.json"
    broken.write_text(open(source).read()[:-2])  # a list cut short: its own error, not JSON Lines'
    with pytest.raises(errors.UserError, match="not a readable LLaVA JSON list of samples"):
        data.read_samples(str(broken), f"{toy}/data/images")


def test_a_new_student_on_a_tower_of_another_shape_than_the_teachers_is_refused_first(
    toy, ckpts, tmp_path, no_weights
):
    """A new student takes the teacher's tower (its new projector is made for that width): --vision
    of another width is refused by name before any weights load, not by a shape error at step 1."""
    config = transformers.AutoConfig.from_pretrained(f"{toy}/vision")
    config.hidden_size *= 2
    wide = tmp_path / "wide"
    with torch.device("meta"):
        transformers.SiglipVisionModel(config).config.save_pretrained(wide)
    shutil.copy(f"{toy}/vision/preprocessor_config.json", wide)
    argv = ["train", "--stage", "dpt", "--data", f"{toy}/data/pretrain.json"]
    argv += ["--images", f"{toy}/data/images", "--out", str(tmp_path / "out")]
    argv += [
        "--vision",
        str(wide),
        "--llm",
        f"{toy}/student_llm",
        "--teacher",
        str(ckpts / "teacher"),
    ]
    argv += ["--global_batch_size", "16", "--batch_size", "8", "--workers", "0"]
    with pytest.raises(SystemExit) as e:
        llava_kd.main(argv)
    assert str(e.value) == (
        f"error: --teacher {ckpts / 'teacher'}: its vision tower is not the shape of --vision "
        f"{wide}'s: hidden_size {config.hidden_size} (teacher {config.hidden_size // 2}); a new "
        f"student takes the teacher's tower: --vision {ckpts / 'teacher'}"
    )


def test_a_teacher_of_other_visual_tokens_is_refused_before_any_weight_is_read(
    toy, ckpts, tmp_path, no_weights
):
    """Compatibility from the configs and processors alone: a teacher whose processor makes 64
    visual tokens an image (the student's: 16) is refused in one line naming it, though reading its
    weights would fail (no_weights)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(ckpts / "teacher", teacher)
    config = json.loads((teacher / "processor_config.json").read_text())
    config["image_processor"]["size"] = {"height": 64, "width": 64}
    (teacher / "processor_config.json").write_text(json.dumps(config))
    argv = args(toy, "dft", tmp_path / "out") + ["--init", str(ckpts / "student")]
    with pytest.raises(SystemExit) as e:
        llava_kd.main(argv + ["--teacher", str(teacher)])
    assert str(e.value) == (
        "error: teacher and student cannot be distilled:\n  visual tokens per image differ: "
        "teacher 64, student 16 (use the teacher's vision tower for the student: --vision "
        "TEACHER_DIR)"
    )
