"""train.sh's toy recipe end to end, shortened to a few steps per stage: every stage, eval and the
table. It runs beside the other tests, from the start of the session (conftest.py's `recipe`)."""

import json
import os

import toy as toy_module
import toy_data

ROWS = [
    "question-only prior (no image)",
    "teacher PT-SFT",
    "student PT-SFT",
    "student DPT-SFT",
    "student PT-SFT-DFT",
    "student DPT-SFT-DFT (LLaVA-KD)",
    "student PT-SFT-SFT (no teacher)",
]


def test_toy_recipe_runs_end_to_end_and_prints_the_table(recipe):
    out, proc, output, _, _ = recipe  # train.sh with OUT and conftest.py's TOY_RECIPE
    assert proc.wait(timeout=900) == 0, output.read_text()[-3000:]
    stdout = output.read_text()
    table = (out / "toy" / "table.md").read_text()
    differences, rows = table.split("\n\n")[:2]
    assert len(differences.splitlines()) == 2 + 3  # the three paired differences, one seed each
    lines = [row for row in rows.splitlines() if row.startswith("| ") and "---" not in row][1:]
    assert [row.split(" | ")[0][2:] for row in lines] == ROWS
    assert all(row.endswith("| 1 |") for row in lines)  # seeds per row
    assert table.splitlines()[0] in stdout and "wall time" in stdout
    results = [json.loads(line) for line in open(out / "toy" / "results.jsonl")]
    assert len(results) == 2 + 5  # exact-match counts over the 6 test questions (2 images)
    assert all(r["accuracy"] * 6 == round(r["accuracy"] * 6) for r in results)
    # the distilled stages ran with a teacher, the others without
    for stage, teacher in (
        ("pt", False),
        ("dpt", True),
        ("pt-sft-dft", True),
        ("pt-sft-sft", False),
    ):
        log = [json.loads(line) for line in open(out / "toy" / "seed1" / stage / "log.jsonl")]
        train = [r for r in log if "loss" in r]
        assert len(train) == 4 and all((r["L_vis"] > 0) == teacher for r in train)
        (held_out,) = [r for r in log if "eval_loss" in r]  # the held-out split, at the end
        assert held_out["step"] == 4 and (held_out["eval_L_vis"] > 0) == teacher
    assert "plot: 9 panels of 3 stage(s)" in stdout and (out / "toy" / "curves.png").exists()
    # the toy setup is TOY_SEED's draw
    toy_data.make_toy_data(
        str(out / "draw1"), 1, **{k: v for k, v in toy_module.QUICK.items() if k[:2] == "n_"}
    )
    for split in ("sft", "test"):
        assert (out / "draw1" / f"{split}.json").read_text() == (
            out / "toy/setup/data" / f"{split}.json"
        ).read_text()


def outputs(out):
    """Every stage's weights and the eval results."""
    found = {p.relative_to(out): p.read_bytes() for p in out.glob("**/model.safetensors")}
    found["results"] = sorted(open(out / "results.jsonl"))
    return found


def continued_as_uninterrupted(recipe, which):
    out, proc, _, *runs = recipe
    stopped, first, finished, again = runs[which].value()
    assert proc.wait(timeout=900) == 0
    assert first != 0 and again == 0
    name = ("in-dft", "between")[which]
    assert outputs(out / name) == outputs(out / "toy")  # bitwise
    # nothing finished trained again, nor written over
    assert finished and {p: os.stat(p).st_mtime_ns for p in finished} == finished
    return stopped, out / name


def test_a_recipe_killed_in_its_dft_stage_continues_where_it_stopped_with_the_same_command(recipe):
    stopped, out = continued_as_uninterrupted(recipe, 0)
    assert stopped is not None  # killed in the middle, after a checkpoint
    step, logged = stopped
    assert 1 <= step < 4
    lines = open(out / "seed1" / "dpt-sft-dft" / "log.jsonl").readlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 4]  # + the held-out one
    assert lines[:step] == logged  # resumed at its checkpoint: the steps before it not run again


def test_a_recipe_killed_between_stages_continues_with_the_same_command(recipe):
    finished, _ = continued_as_uninterrupted(recipe, 1)
    assert finished is not None and finished >= 3  # teacher-pt, seed1/pt, seed1/dpt at least
