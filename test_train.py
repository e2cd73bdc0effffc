"""The training loop on the toy setup: DDP equivalence, resume, every stage, NaN handling."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import llava_kd

ROOT = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ckpts(toy, tmp_path_factory):
    """An (untrained) teacher and student LLaVA checkpoint built from the toy parts."""
    out = tmp_path_factory.mktemp("ckpts")
    for name in ("teacher", "student"):
        torch.manual_seed(0)
        model, proc = llava_kd.build_student(f"{toy}/vision", f"{toy}/{name}_llm")
        llava_kd.save_checkpoint_files(model, proc, out / name)
    return out


def args(toy, stage, out, *extra):
    data = "pretrain" if stage in ("pt", "dpt") else "sft"
    return ["train", "--stage", stage, "--data", f"{toy}/data/{data}.json", "--images", f"{toy}/data/images",
            "--out", str(out), "--workers", "0", "--global_batch_size", "16", "--batch_size", "8", *extra]


def weights(d):  # by module name (the file on disk keeps transformers' older key names)
    return transformers.LlavaForConditionalGeneration.from_pretrained(d).state_dict()


def changed(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_two_processes_end_with_the_weights_of_one(toy, ckpts, tmp_path):
    common = ["--init", str(ckpts / "student"), "--teacher", str(ckpts / "teacher"), "--lr", "1e-3", "--max_steps", "3"]
    llava_kd.main(args(toy, "dft", tmp_path / "one", *common))  # 1 process x 8 x 2 micro-steps
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "llava_kd.py",
           *args(toy, "dft", tmp_path / "two", *common)]
    cmd[cmd.index("--batch_size") + 1] = "4"  # 2 processes x 4 x 2 micro-steps: the same global batch of 16
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    one, two, start = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(ckpts / "student")
    assert max((one[k] - start[k]).abs().max() for k in one) > 1e-4  # training moved the weights
    # Adam divides each entry's gradient by its own root mean square, so where a gradient is ~1e-8 the rounding of
    # another summation order reaches the update (3e-6 seen after 3 steps); a data-parallel bug moves weights ~lr
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=1e-5, msg=k)
    logs = [[json.loads(l) for l in open(tmp_path / d / "log.jsonl")] for d in ("one", "two")]
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["L_vis"] == pytest.approx(b["L_vis"], rel=1e-5)


def test_stopped_and_resumed_run_equals_uninterrupted(toy, ckpts, tmp_path):
    common = ["--init", str(ckpts / "student"), "--lr", "1e-3", "--save_every", "1"]
    llava_kd.main(args(toy, "sft", tmp_path / "whole", *common, "--max_steps", "4"))
    llava_kd.main(args(toy, "sft", tmp_path / "parts", *common, "--max_steps", "2"))
    llava_kd.main(args(toy, "sft", tmp_path / "parts", *common, "--max_steps", "4", "--resume"))
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert changed(a, weights(ckpts / "student"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7, msg=k)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "parts" / "log.jsonl")]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match="another data size, --global_batch_size or --seed"):
        llava_kd.main(args(toy, "sft", tmp_path / "parts", *common, "--seed", "1", "--resume"))


@pytest.mark.parametrize("stage", ["pt", "dpt", "sft", "dft"])
def test_each_stage_trains_its_parts_and_writes_a_stock_checkpoint(toy, ckpts, tmp_path, stage):
    extra = ["--init", str(ckpts / "student"), "--max_steps", "2", "--lr", "1e-3"]
    if llava_kd.STAGES[stage]["teacher"]:
        extra += ["--teacher", str(ckpts / "teacher")]
    llava_kd.main(args(toy, stage, tmp_path, *extra))
    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path)
    transformers.AutoProcessor.from_pretrained(tmp_path)
    diff = changed(weights(tmp_path), weights(ckpts / "student"))
    parts = {next(p for p, pre in llava_kd.PARTS.items() if k.startswith(pre)) for k in diff}
    assert parts == ({"projector"} if stage in ("pt", "dpt") else {"projector", "llm"})
    assert model.config.image_seq_length == 16  # 32px, patch 8, all patches kept
    log = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]
    assert all((r["L_vis"] > 0) == llava_kd.STAGES[stage]["teacher"] for r in log)


def test_ablation_flags_turn_terms_off(toy, ckpts, tmp_path):
    extra = ["--init", str(ckpts / "student"), "--teacher", str(ckpts / "teacher"), "--max_steps", "1",
             "--beta", "0", "--gamma", "0"]
    llava_kd.main(args(toy, "dft", tmp_path, *extra))
    (rec,) = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert rec["L_res"] > 0 and rec["L_vis"] == 0 and rec["L_rel"] == 0
    assert rec["loss"] == pytest.approx(rec["L_reg"] + rec["L_res"])


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(toy, ckpts, tmp_path):
    extra = ["--init", str(ckpts / "student"), "--lr", "1e30", "--save_every", "1", "--max_steps", "8"]
    with pytest.raises(SystemExit, match=r"at step (\d+); stopped without saving") as e:
        llava_kd.main(args(toy, "sft", tmp_path, *extra))
    bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
    state = torch.load(tmp_path / "checkpoint" / "train_state.pt", weights_only=False)
    assert 1 <= state["step"] == bad_step - 1
    transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "checkpoint")
    assert not os.path.exists(tmp_path / "checkpoint.tmp")


def test_bad_flags_are_refused_with_the_flag_named(toy, ckpts, tmp_path):
    with pytest.raises(SystemExit, match="needs --teacher"):
        llava_kd.main(args(toy, "dpt", tmp_path, "--init", str(ckpts / "student")))
    with pytest.raises(SystemExit, match="--global_batch_size 16 must be a multiple of --batch_size 5"):
        llava_kd.main(args(toy, "pt", tmp_path, "--init", str(ckpts / "student"), "--batch_size", "5"))
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        llava_kd.main(args(toy, "pt", tmp_path / "new", "--resume"))


def test_next_token_loss_equals_the_models_own_loss(toy, ckpts):
    import data
    model, proc = llava_kd.load_llava(ckpts / "student")
    ds = data.LlavaDataset(f"{toy}/data/sft.json", f"{toy}/data/images", proc, chat=True, max_length=256)
    b = data.collate([ds[i] for i in range(4)], proc.tokenizer.pad_token_id)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                labels=b["labels"])
    torch.testing.assert_close(llava_kd.next_token_loss(out.logits, b["labels"]), out.loss)
