"""toy.py's world, its table and its eval: what the README's account of the toy rests on."""

import collections
import json
import random

import pytest
from PIL import Image

import toy as toy_module
import toy_data


def pictures():
    """{the bytes of a picture: the object drawn}, for every object the toy draws."""
    objects = [
        dict(colour=c, shape=s, size=z, place=p)
        for c in toy_data.COLOURS
        for s in toy_data.SHAPES
        for z in toy_data.SIZES
        for p in toy_data.PLACES
    ]
    return {toy_data.draw(o).tobytes(): o for o in objects}


def test_training_answers_are_one_annotators_and_the_test_asks_for_the_consensus(tmp_path):
    """A training row's answers are the facts of the kind drawn, or (NOISE of the time) of the kind
    of the other size; the test asks every question of each image once, with the true facts; the
    student's LLM reads about a third of the kinds, in a third of the teacher's documents."""
    sizes = dict(n_pretrain=20, n_sft=800, n_teacher_sft=20, n_test=40, n_text=900)
    toy_data.make_toy_data(str(tmp_path), 3, **sizes)
    world = toy_data.make_world(random.Random(3))  # the draw's first
    drawn = pictures()
    key_of = dict(toy_data.QUESTIONS)

    def facts(row):
        o = drawn[Image.open(tmp_path / "images" / row["image"]).convert("RGB").tobytes()]
        keys = [key_of[c["value"].removeprefix("<image>\n")] for c in row["conversations"][::2]]
        other = o | {"size": "small" if o["size"] == "big" else "big"}
        true, misjudged = ([world[toy_data.kind(x)][k] for k in keys] for x in (o, other))
        return [c["value"] for c in row["conversations"][1::2]], true, misjudged

    noisy = []
    for row in json.load(open(tmp_path / "sft.json")):
        if "image" in row:
            given, true, misjudged = facts(row)
            assert given in (true, misjudged)
            if true != misjudged:
                noisy.append(given == misjudged)
    assert abs(sum(noisy) / len(noisy) - toy_data.NOISE) < 0.07  # ~700 rows: s.e. 0.017
    test = json.load(open(tmp_path / "test.json"))
    assert len(test) == 40 * len(toy_data.QUESTIONS)
    for row in test:
        given, true, _ = facts(row)
        assert given == true
    asked = collections.Counter((r["image"], r["conversations"][0]["value"]) for r in test)
    assert set(asked.values()) == {1}
    text = json.load(open(tmp_path / "text.json"))
    named = {role: {d["text"].split(" is called")[0] for d in docs} for role, docs in text.items()}
    assert len(text["teacher_llm"]) == 3 * len(text["student_llm"]) == 900
    assert len(named["teacher_llm"]) == len(world)  # every kind
    assert named["student_llm"] < named["teacher_llm"]
    assert len(named["student_llm"]) == len(world) // 3


def results(path, seeds, rows=None):
    """A results.jsonl: {seed: accuracies in %, in `rows`' order}."""
    rows = rows or (toy_module.CONTROL, toy_module.KD, "student PT-SFT", "student DPT-SFT")
    lines = [{"row": "teacher PT-SFT", "seed": 0, "accuracy": 0.9}]
    lines += [
        {"row": r, "seed": s, "accuracy": v / 100}
        for s, acc in seeds.items()
        for r, v in zip(rows, acc)
    ]
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def test_the_table_pairs_each_difference_by_seed_and_pools_the_seeds_of_several_runs(tmp_path):
    a = results(tmp_path / "a" / "results.jsonl", {0: (40, 45, 30, 31), 1: (50, 51, 33, 30)})
    b = results(tmp_path / "b" / "results.jsonl", {0: (30, 39, 20, 24)})
    text = toy_module.table([a], str(tmp_path / "t.md"))
    assert (tmp_path / "t.md").read_text() == text + "\n"
    # LLaVA-KD - control: +5, +1: mean +3.0, sd 2.83, s.e. 2.0; DPT-SFT - PT-SFT: +1, -3
    assert "| DPT-SFT-DFT (LLaVA-KD) - PT-SFT-SFT (no teacher) | +3.0 ± 2.0 | +5.0 +1.0 |" in text
    assert "| DPT-SFT - PT-SFT | -1.0 ± 2.0 | +1.0 -3.0 |" in text
    assert "PT-SFT-DFT - " not in text  # no such row in these runs
    assert "| student PT-SFT-SFT (no teacher) | 45.0 ± 7.1 | 2 |" in text
    assert "| teacher PT-SFT | 90.0 ± 0.0 | 1 |" in text
    both = toy_module.table([a, b], str(tmp_path / "t.md"), seconds=125)
    # seed 0 of each run is a seed of its own: +5, +1, +9
    assert (
        "| DPT-SFT-DFT (LLaVA-KD) - PT-SFT-SFT (no teacher) | +5.0 ± 2.3 | +5.0 +1.0 +9.0 |" in both
    )
    assert "| teacher PT-SFT | 90.0 ± 0.0 | 2 |" in both and both.endswith("wall time 2 min 5 s")
    with pytest.raises(SystemExit, match="no results file .*nowhere.jsonl"):
        toy_module.table([str(tmp_path / "nowhere.jsonl")], str(tmp_path / "t.md"))


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
