"""The held-out set in the loop (--eval_data), the plot command, --report_to."""

import importlib.util
import json
import os
import signal

import pytest
import torch
from conftest import Forked, args, ended, finish, processes, refused, weights
from PIL import Image

import evaluation
import llava_kd
import plot


def records(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def distill(toy, ckpts, out, *extra):
    teacher = ["--teacher", str(ckpts / "teacher"), "--init", str(ckpts / "student")]
    return args(toy, "dft", out, *teacher, "--lr", "1e-3", *extra)


def write_rows(path, rows):
    with open(path, "w") as f:
        json.dump(rows, f)
    return str(path)


def test_an_eval_record_is_the_training_loss_of_the_same_weights_on_the_same_rows(
    toy, ckpts, tmp_path
):
    """--eval_data = --data and a global batch of every sample: the record after step 1 and step
    2's training loss read the same weights (AdamW's step 1 between), the same rows, the same
    counts; every term of dft (L_reg, L_res, L_vis, L_rel) and the loss. A mean over each
    micro-batch's own rows, or counts of the wrong term, would differ (the toy's micro-batches
    differ in answer rows, visual rows and images)."""
    sft = f"{toy}/data/sft.json"
    n = len(json.load(open(sft)))
    extra = ["--epochs", "2", "--eval_data", sft, "--eval_every", "1"]
    argv = distill(toy, ckpts, tmp_path / "run", *extra)
    argv[argv.index("--global_batch_size") + 1] = str(n // 4 * 4)
    argv[argv.index("--batch_size") + 1] = "4"
    first = json.load(open(sft))[: n // 4 * 4]  # exactly one global batch
    argv[argv.index("--data") + 1] = argv[argv.index("--eval_data") + 1] = write_rows(
        tmp_path / "rows.json", first
    )
    llava_kd.main(argv)
    log = records(tmp_path / "run")
    train = [r for r in log if "loss" in r]
    held_out = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in held_out] == [1, 2]
    assert held_out[0]["eval_samples"] == len(first)
    for key in ("loss", "L_reg", "L_res", "L_vis", "L_rel"):
        assert train[1][key] > 0, key
        assert held_out[0][f"eval_{key}"] == pytest.approx(train[1][key], rel=2e-5), key
    # the weights did move between: a record of the weights before step 1 would differ
    assert held_out[0]["eval_loss"] != pytest.approx(train[0]["loss"], rel=1e-3)
    # and training is what it is without --eval_data: the same weights, bit for bit
    without = argv[: argv.index("--eval_data")] + argv[argv.index("--eval_every") + 2 :]
    llava_kd.main([x if x != str(tmp_path / "run") else str(tmp_path / "plain") for x in without])
    a, b = weights(tmp_path / "run"), weights(tmp_path / "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_log_the_eval_terms_of_one(toy, ckpts, tmp_path):
    """9 held-out samples (not the training ones) over 2 processes x 4 a micro-batch: 5 and 4, so
    one process runs a stand-in micro-batch beside the other's second; the records equal those of
    one process, every term."""
    rows = json.load(open(f"{toy}/data/test.json"))[:6] + json.load(open(f"{toy}/data/sft.json"))
    held = write_rows(tmp_path / "held.json", [r for r in rows if "image" in r][:8] + rows[-1:])
    extra = ["--max_steps", "2", "--eval_data", held, "--eval_every", "1", "--batch_size", "4"]
    two = processes(*distill(toy, ckpts, tmp_path / "two", *extra))
    llava_kd.main(distill(toy, ckpts, tmp_path / "one", *extra))
    finish(two)
    one = [r for r in records(tmp_path / "one") if "eval_loss" in r]
    both = [r for r in records(tmp_path / "two") if "eval_loss" in r]
    assert [r["step"] for r in one] == [r["step"] for r in both] == [1, 2]
    for a, b in zip(one, both):
        assert a["eval_samples"] == b["eval_samples"] == 9
        for key in ("eval_loss", "eval_L_reg", "eval_L_res", "eval_L_vis", "eval_L_rel"):
            assert a[key] > 0 and b[key] == pytest.approx(a[key], rel=1e-4), key


def test_a_bad_held_out_sample_is_refused_before_any_weights_load(toy, tmp_path, no_weights):
    """Checked as --data is: the file and the sample id named, every process's share."""
    rows = json.load(open(f"{toy}/data/sft.json"))[:4]
    rows[2] = dict(rows[2], id="held_2", image="nowhere.png")
    held = write_rows(tmp_path / "held.json", rows)
    message = refused(distill_pt(toy, tmp_path, "--eval_data", held))
    assert held in message and "held_2" in message and "nowhere.png" in message, message


def distill_pt(toy, out, *extra):
    return args(
        toy, "pt", out / "run", "--vision", f"{toy}/vision", "--llm", f"{toy}/student_llm", *extra
    )


def test_a_held_out_image_that_does_not_decode_is_left_out_with_a_note(toy, tmp_path, capsys):
    """Its header read, its pixels cut off: the run goes on, the record counts the others."""
    rows = [r for r in json.load(open(f"{toy}/data/pretrain.json"))][:6]
    source = open(f"{toy}/data/images/{rows[0]['image']}", "rb").read()
    with open(tmp_path / "cut.png", "wb") as f:
        f.write(source[: len(source) // 2])
    rows[1] = dict(rows[1], id="cut_1", image=str(tmp_path / "cut.png"))
    held = write_rows(tmp_path / "held.json", rows)
    llava_kd.main(distill_pt(toy, tmp_path, "--max_steps", "1", "--eval_data", held))
    out = capsys.readouterr().out
    assert "cut_1" in out and "left out of the held-out losses" in out, out
    (rec,) = [r for r in records(tmp_path / "run") if "eval_loss" in r]
    assert rec["step"] == 1 and rec["eval_samples"] == 5 and rec["eval_L_reg"] > 0


def test_eval_flags_without_eval_data_and_tensorboard_without_the_package(
    toy, tmp_path, no_weights, monkeypatch
):
    message = refused(distill_pt(toy, tmp_path, "--eval_every", "10"))
    assert "--eval_data" in message
    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else find(name, *a),
    )
    message = refused(distill_pt(toy, tmp_path, "--report_to", "tensorboard"))
    assert (
        message
        == "error: --report_to tensorboard needs the tensorboard package: pip install tensorboard"
    )


def test_plot_draws_every_logged_quantity_of_stages_one_after_another(toy, ckpts, tmp_path):
    """A real log (a pt stage, then a dft stage with held-out records): a PNG with a panel for each
    quantity that a stage computed, the held-out dots in their colour; no log: one line."""
    pt = distill_pt(toy, tmp_path, "--max_steps", "3")
    llava_kd.main(pt)
    held = f"{toy}/data/sft.json"
    dft = distill(
        toy, ckpts, tmp_path / "dft", "--max_steps", "4", "--eval_data", held, "--eval_every", "2"
    )
    llava_kd.main(dft)
    png = tmp_path / "curves.png"
    llava_kd.main(["plot", str(tmp_path / "run"), str(tmp_path / "dft"), "--out", str(png)])
    image = Image.open(png).convert("RGB")
    stages = plot.read_logs([tmp_path / "run", tmp_path / "dft"])
    shown = [k for k in plot.PANELS if plot.series(stages, k)]
    # pt computes L_reg alone, dft every term of its weights; L_pro (--delta 0) nowhere
    assert {"loss", "L_reg", "L_res", "L_vis", "L_rel", "lr", "grad_norm"} <= set(shown)
    assert "L_pro" not in shown
    rows = -(-len(shown) // plot.COLUMNS)
    assert image.size == (plot.COLUMNS * plot.W, 56 + rows * plot.H)
    colours = {c for _, c in image.getcolors(2**24)}
    assert plot.MEAN in colours and plot.HELD_OUT in colours
    for i in range(len(shown)):  # every panel has its curve in it
        x0, y0 = (i % plot.COLUMNS) * plot.W, 56 + (i // plot.COLUMNS) * plot.H
        box = (
            x0 + plot.LEFT + 1,
            y0 + plot.TOP + 1,
            x0 + plot.W - plot.RIGHT - 1,
            y0 + plot.H - plot.BOTTOM - 1,
        )
        inside = {c for _, c in image.crop(box).getcolors(2**24)}
        assert plot.MEAN in inside or plot.HELD_OUT in inside, shown[i]
    assert os.path.getsize(png) > 10_000
    message = refused(["plot", str(tmp_path)])
    assert str(tmp_path) in message and "log.jsonl" in message
    message = refused(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "no" / "c.png")])
    assert "no such folder" in message


def test_a_signal_during_an_evaluation_stops_after_the_next_step_and_the_run_goes_on(
    toy, ckpts, tmp_path, monkeypatch
):
    """SIGTERM while step 1's held-out records are made: it is part of the step (watched, as its
    collectives are), the stop comes after step 2 with a checkpoint, and the same command ends with
    the weights and the records of a run never stopped, each record once."""
    data = write_rows(tmp_path / "rows.json", json.load(open(f"{toy}/data/sft.json"))[:48])
    held = f"{toy}/data/sft.json"

    def command(out):
        argv = distill(toy, ckpts, out, "--eval_data", held, "--eval_every", "1", "--auto_resume")
        argv[argv.index("--data") + 1] = data
        return argv

    llava_kd.main(command(tmp_path / "whole"))
    real = evaluation.evaluate
    calls = []

    def signalled(*args):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    with monkeypatch.context() as m:
        m.setattr(evaluation, "evaluate", signalled)
        (output,) = ended([Forked(command(tmp_path / "stopped"), {})])
    assert "error: stopped by SIGTERM at step 2 of 3" in output, output[-2000:]
    assert "Traceback" not in output
    llava_kd.main(command(tmp_path / "stopped"))
    whole, stopped = weights(tmp_path / "whole"), weights(tmp_path / "stopped")
    assert all(torch.equal(whole[k], stopped[k]) for k in whole)
    steps = [(r["step"], "eval_loss" in r) for r in records(tmp_path / "stopped")]
    assert steps == [(s, e) for s in (1, 2, 3) for e in (False, True)]
    ours = [r["eval_loss"] for r in records(tmp_path / "stopped") if "eval_loss" in r]
    assert ours == [r["eval_loss"] for r in records(tmp_path / "whole") if "eval_loss" in r]
