"""Several data sources in one stage: --data FILE ... with an --images folder each (or one for all),
one epoch order over all their samples, their ids kept apart, every refusal naming its file."""

import json
import shutil

import pytest
import torch
import transformers
from conftest import args, refused, weights

import data
import llava_kd


@pytest.fixture
def sources(toy, tmp_path):
    """48 toy rows in two files, each with its own image folder; b.json reuses a.json's ids. And
    merged.json: the same rows in the same order, with their images' whole paths."""
    rows = json.load(open(f"{toy}/data/sft.json"))[:48]
    merged = []
    for name, part in (("a", rows[:24]), ("b", rows[24:])):
        folder = tmp_path / f"images_{name}"
        folder.mkdir()
        for r in part:
            if "image" in r:
                shutil.copy(f"{toy}/data/images/{r['image']}", folder / r["image"])
        ids = [dict(r, id=f"s{i}") for i, r in enumerate(part)]  # the same ids in both files
        (tmp_path / f"{name}.json").write_text(json.dumps(ids))
        merged += [dict(r, image=str(folder / r["image"])) if "image" in r else r for r in ids]
    (tmp_path / "merged.json").write_text(json.dumps(merged))
    return tmp_path


def argv_of(toy, ckpts, out, data_files, folders, *extra):
    argv = args(toy, "sft", out, "--init", str(ckpts / "student"), "--lr", "1e-3", *extra)
    i = argv.index("--data")
    argv[i : i + 4] = ["--data", *map(str, data_files), "--images", *map(str, folders)]
    return argv


def test_two_files_train_as_their_rows_in_one_file_and_resume_exactly(toy, ckpts, sources):
    """--data a.json b.json --images A B trains bit for bit as one file of the same rows in the
    same order (2 epochs of 3 steps); stopped after 3 steps and resumed, it ends the same."""
    two = [sources / "a.json", sources / "b.json"]
    folders = [sources / "images_a", sources / "images_b"]
    extra = ["--epochs", "2", "--save_every", "1"]
    llava_kd.main(argv_of(toy, ckpts, sources / "two", two, folders, *extra))
    llava_kd.main(argv_of(toy, ckpts, sources / "one", [sources / "merged.json"], ["/"], *extra))
    stop = argv_of(toy, ckpts, sources / "stopped", two, folders, *extra, "--max_steps", "3")
    llava_kd.main(stop)
    llava_kd.main(stop[: stop.index("--max_steps")] + ["--resume"])
    a, b, c = (weights(sources / d) for d in ("two", "one", "stopped"))
    assert any(not torch.equal(a[k], weights(ckpts / "student")[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    # the data a checkpoint continues on is both files': one changed is other data
    rows = json.load(open(sources / "b.json"))
    (sources / "b.json").write_text(json.dumps(rows[:-1]))
    message = refused(stop[: stop.index("--max_steps")] + ["--auto_resume"])
    assert "was written on other data" in message, message


@pytest.mark.parametrize("grouped", [False, True])
def test_every_sample_of_every_file_is_in_each_epoch_once(toy, ckpts, sources, grouped):
    """The epoch order (plain or grouped by length) over the samples of both files: each of the 48
    once an epoch, by ids that name their file (b.json's repeat a.json's)."""
    two = [str(sources / "a.json"), str(sources / "b.json")]
    folders = [str(sources / "images_a"), str(sources / "images_b")]
    samples = data.read_sources(two, folders)
    ids = [sid for sid, _, _ in samples]
    assert len(set(ids)) == 48 and ids[0] == f"{two[0]}:s0" and ids[24] == f"{two[1]}:s0"
    processor = transformers.AutoProcessor.from_pretrained(ckpts / "student")
    ds = data.LlavaDataset("--data", None, processor, True, 512, samples)
    for epoch in (0, 1):
        order = [i for r in (0, 1) for i in data.epoch_order(ds, 16, 8, 2, r, 0, epoch, grouped)]
        assert sorted(order) == list(range(48))


def test_a_bad_sample_in_the_second_file_is_refused_naming_that_file(
    toy, ckpts, sources, no_weights
):
    rows = json.load(open(sources / "b.json"))
    rows[5]["conversations"] = rows[5]["conversations"][:1]  # no answer
    (sources / "b.json").write_text(json.dumps(rows))
    two = [sources / "a.json", sources / "b.json"]
    folders = [sources / "images_a", sources / "images_b"]
    message = refused(argv_of(toy, ckpts, sources / "out", two, folders))
    assert message.startswith(f"error: {sources / 'b.json'}: sample s5: "), message
    # the images of a file are looked for in its own folder
    with pytest.raises(SystemExit) as e:
        llava_kd.main(argv_of(toy, ckpts, sources / "out", two, folders[::-1]))
    message = str(e.value)
    assert message.startswith(f"error: {sources / 'a.json'}: ") and "images_b" in message, message


def test_the_folders_must_be_one_or_one_a_file(toy, ckpts, sources, no_weights):
    two = [sources / "a.json", sources / "b.json"]
    three = [sources / "images_a"] * 3
    message = refused(argv_of(toy, ckpts, sources / "out", two, three))
    assert "--images: 3 folders for 2 --data files" in message
    message = refused(argv_of(toy, ckpts, sources / "out", two[:1] * 2, three[:1]))
    assert "a file given twice" in message
