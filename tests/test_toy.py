"""toy.py's diagnostics, which the README's account of the toy quotes: the linear probe, `probe`,
and `draws`."""

import json
import random
import re

import pytest
import torch

import checkpoints
import data
import models
import toy as toy_module


def test_linear_probe_reads_what_is_linearly_there_and_nothing_else():
    torch.manual_seed(0)
    x = torch.randn(3000, 8)
    x = x[(x[:, 2].abs() > 0.3) & (x[:, 5].abs() > 0.3)][:900]  # a margin between the classes
    y = (x[:, 2] > 0).long() + 2 * (
        x[:, 5] > 0
    ).long()  # four classes, each a quadrant of two features
    assert toy_module._linear_probe(x, y, 600) > 0.97
    # labels unrelated to x: held-out accuracy stays near chance (0.25)
    noise = torch.randint(0, 4, (900,))
    assert toy_module._linear_probe(x, noise, 600) < 0.4


def test_probe_scores_every_answer_token_and_every_visual_position(toy, tmp_path):
    model, proc = models.build_student(f"{toy}/vision", f"{toy}/student_llm")
    checkpoints.save_checkpoint_files(model, proc, str(tmp_path))
    report = toy_module.probe(
        str(tmp_path), f"{toy}/data/sft.json", f"{toy}/data/images", n_scenes=30
    )
    ds = data.LlavaDataset(
        f"{toy}/data/sft.json", f"{toy}/data/images", proc, chat=True, max_length=4096
    )
    end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = sum(
        int(((ds[i]["labels"] != data.IGNORE) & (ds[i]["labels"] != end)).sum())
        for i in range(len(ds))
    )
    assert f"answer tokens ({answers})" in report
    numbers = dict(re.findall(r"(p\(label\)|top-1 = label|colour|shape) (\d\.\d+)", report))
    assert set(numbers) == {"p(label)", "top-1 = label", "colour", "shape"}
    assert all(0 <= float(v) <= 1 for v in numbers.values())
    scenes = [toy_module._toy_scene(random.Random(i)) for i in range(3)]
    lp, labels, visual = toy_module._answer_and_visual_outputs(
        model.eval(), proc, f"{toy}/data/sft.json", f"{toy}/data/images", scenes
    )
    assert lp.shape == (len(labels), model.config.text_config.vocab_size)
    # every visual position of every image
    assert visual.shape[:2] == (
        3,
        data.image_seq_length(proc),
    )


def test_draws_pairs_each_difference_seed_by_seed_and_pools_the_runs(tmp_path):
    runs = {
        "a": {
            0: (40, 50, 47, 45, 44),
            1: (42, 41, 50, 51, 52),
        },  # seed: PT-SFT, DPT-SFT, PT-SFT-DFT, KD, control
        "b": {5: (30, 33, 35, 40, 36)},
    }
    rows = (
        "student PT-SFT",
        "student DPT-SFT",
        "student PT-SFT-DFT",
        toy_module.KD,
        toy_module.CONTROL,
    )
    paths = []
    for run, seeds in runs.items():
        (tmp_path / run).mkdir()
        lines = [{"row": "teacher PT-SFT", "seed": 0, "accuracy": 0.7}]
        lines += [
            {"row": r, "seed": s, "accuracy": v / 100}
            for s, acc in seeds.items()
            for r, v in zip(rows, acc)
        ]
        paths.append(str(tmp_path / run / "results.jsonl"))
        with open(paths[-1], "w") as f:
            f.write("".join(json.dumps(rec) + "\n" for rec in lines))
    report = toy_module.draws(paths, str(tmp_path / "report.md"))
    assert (tmp_path / "report.md").read_text() == report + "\n"
    assert f"| {tmp_path / 'a'} | 70.0 | 41.0 | 45.5 | 48.5 | 48.0 | 48.0 |" in report
    kd = report.split("minus")[1]  # LLaVA-KD minus the control: a: +1.0, -1.0; b: +4.0
    assert "+1.0, -1.0 (mean +0.0)" in kd and "+4.0 (mean +4.0)" in kd
    # all three seeds: mean 4/3, sd of (1, -1, 4) 2.5; the runs' means 0 and 4: sd 2.8, standard
    # error 2.0
    assert (
        "all 3 seeds: mean +1.3, sd 2.5, above 0 in 2 of 3; the 2 runs' means: sd 2.8, standard "
        "error of their mean 2.0" in kd
    )
    dpt = report.split("DPT-SFT minus PT-SFT")[1]
    assert "+10.0, -1.0 (mean +4.5)" in dpt and "+3.0 (mean +3.0)" in dpt
    with open(tmp_path / "teacher.jsonl", "w") as f:
        f.write(json.dumps({"row": "teacher PT-SFT", "seed": 0, "accuracy": 0.7}) + "\n")
    with pytest.raises(SystemExit, match="teacher.jsonl has no rows"):
        toy_module.draws([str(tmp_path / "teacher.jsonl")])
    with pytest.raises(SystemExit, match="no results file .*nowhere.jsonl"):
        toy_module.draws([str(tmp_path / "nowhere.jsonl")])


def test_the_question_only_prior_is_the_most_frequent_answer_to_the_same_question(tmp_path):
    def rows(pairs):
        turns = [
            [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
            for q, a in pairs
        ]
        return json.dumps([{"id": str(i), "conversations": t} for i, t in enumerate(turns)])

    train = [("colour?", "red"), ("colour?", "red"), ("colour?", "blue"), ("shape?", "disc")]
    (tmp_path / "train.json").write_text(rows(train))
    # colour: red, the prior's (right); shape: disc (right); size: unseen (wrong)
    test = [("colour?", "red"), ("shape?", "disc"), ("size?", "big")]
    (tmp_path / "test.json").write_text(rows(test))
    prior = toy_module.question_prior(str(tmp_path / "train.json"), str(tmp_path / "test.json"))
    assert prior == 2 / 3


@pytest.mark.parametrize("text", ["", '{"seed": 0, "qu', "[0]"])
def test_a_torn_setup_marker_is_one_line_naming_it(tmp_path, text):
    (tmp_path / "setup.json").write_text(text)
    with pytest.raises(SystemExit) as e:
        toy_module.main(["setup", "--out", str(tmp_path), "--quick"])
    message = str(e.value)
    assert message.startswith(f"error: {tmp_path}/setup.json: cut short or damaged (")
    assert message.endswith(f": delete {tmp_path} to set the toy up again")
