"""The training loop on the toy setup: DDP equivalence, resume, every stage, NaN handling."""

import copy
import json
import math
import os
import socket

import pytest
import torch
import transformers
from conftest import alone, args, changed, finish, launch, processes, torchrun, weights
from safetensors import safe_open

import chat
import checkpoints
import data
import errors
import llava_kd
import models
import processes as procs


def test_one_batch_accumulation_and_two_processes_end_with_the_same_weights(toy, ckpts, tmp_path):
    """A global batch of 16 as 1 x 16, as 1 process x 4 x 4 micro-steps, and as 2 processes x 4 x 2:
    the toy's micro-batches differ in answer rows, visual rows and images (text-only rows), so a
    loop that divided each micro-batch by its own counts would not end where one batch of 16 does.
    """
    common = [
        "--init",
        str(ckpts / "student"),
        "--teacher",
        str(ckpts / "teacher"),
        "--lr",
        "1e-3",
        "--max_steps",
        "2",
    ]

    def run(out, batch):
        argv = args(toy, "dft", tmp_path / out, *common)
        argv[argv.index("--batch_size") + 1] = batch
        return argv

    two = processes(*run("two", "4"))  # 2 processes x 4 x 2, beside the in-process runs
    llava_kd.main(run("one", "16"))
    llava_kd.main(run("accum", "4"))
    # rank 0 names the split: 2 processes x 4 x 2 micro-steps
    assert "(2 x 4 x 2)" in finish(two)[0]
    one, start = weights(tmp_path / "one"), weights(ckpts / "student")
    assert max((one[k] - start[k]).abs().max() for k in one) > 1e-4  # training moved the weights
    # Adam divides each entry's gradient by its own root mean square, so where a gradient is ~1e-8
    # the rounding of another summation order reaches the update (~3e-6 seen); a wrong mean moves
    # weights by ~lr = 1e-3
    for other in ("accum", "two"):
        w = weights(tmp_path / other)
        for k in one:
            torch.testing.assert_close(one[k], w[k], rtol=0, atol=1e-5, msg=f"{other}: {k}")
    logs = {
        d: [json.loads(line) for line in open(tmp_path / d / "log.jsonl")]
        for d in ("one", "accum", "two")
    }
    assert [len(x) for x in logs.values()] == [2, 2, 2]
    for d in ("accum", "two"):
        for a, b in zip(logs["one"], logs[d]):
            for k in ("loss", "L_reg", "L_res", "L_vis", "L_rel"):
                assert a[k] == pytest.approx(b[k], rel=1e-5), (d, k)


def perturbed(module, seed):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data += 0.02 * torch.randn(p.shape, generator=g)


def untie(model):
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    perturbed(model.lm_head, 1)


# Pairs of models that differ from the toy's in one way each: (which model, the change)
VARIANTS = {
    "same": (None, None),
    "the student's own tower": ("student", lambda m: perturbed(m.model.vision_tower, 0)),
    "V_s > V_t": (
        "student",
        lambda m: m.resize_token_embeddings(m.config.text_config.vocab_size + 8),
    ),
    "V_s < V_t": (
        "teacher",
        lambda m: m.resize_token_embeddings(m.config.text_config.vocab_size + 8),
    ),
    "an untied student head": ("student", untie),
}


@pytest.fixture(scope="module")
def pairs(ckpts, tmp_path_factory):
    """{variant: (student dir, teacher dir)}, each pair saved and loaded as any checkpoint is."""
    out = tmp_path_factory.mktemp("pairs")
    found = {}
    for name, (which, change) in VARIANTS.items():
        dirs = {"student": ckpts / "student", "teacher": ckpts / "teacher"}
        if change:
            model, proc = models.load_llava(dirs[which], torch.float32)
            change(model)
            dirs[which] = out / name.replace(" ", "-") / which
            checkpoints.save_checkpoint_files(model, proc, dirs[which])
        found[name] = (dirs["student"], dirs["teacher"])
    return found


def test_an_untied_head_trains_in_every_stage_that_trains_the_llm_and_is_saved_untied(
    toy, pairs, tmp_path
):
    student_dir, teacher_dir = pairs["an untied student head"]
    before = weights(student_dir)
    for stage in ("sft", "dft"):
        teacher = ["--teacher", str(teacher_dir)] if stage == "dft" else []
        flags = ["--init", str(student_dir), "--max_steps", "1", "--lr", "1e-2", *teacher]
        llava_kd.main(args(toy, stage, tmp_path / stage, *flags))
        model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / stage)
        head, embeddings = model.lm_head.weight, model.get_input_embeddings().weight
        assert head.data_ptr() != embeddings.data_ptr() and not torch.equal(head, embeddings)
        after = model.state_dict()
        for name in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
            assert not torch.equal(after[name], before[name]), (stage, name)


@pytest.mark.parametrize(
    "stage,variant",
    [("dpt", "same"), ("dft", "same"), ("dpt", "the student's own tower")]
    + [("dft", v) for v in VARIANTS if v != "same"],
)
def test_a_real_step_equals_the_equations_on_the_stock_models_logits(
    toy, pairs, tmp_path, stage, variant
):
    """One logged step (8 samples in 2 micro-batches, every term on) and its gradient, against
    float64 math (test_losses.reference, written from the equations) on the logits of the stock
    LlavaForConditionalGeneration forward of both models; for a pair that shares everything, and
    for pairs that differ one way each (a student with its own vision tower, a larger or smaller
    vocabulary than the teacher's, an untied head)."""
    from test_losses import NAMES, reference

    student_dir, teacher_dir = pairs[variant]
    flags = [
        "--init",
        str(student_dir),
        "--teacher",
        str(teacher_dir),
        "--max_steps",
        "1",
        "--delta",
        "0.3",
    ]
    argv = args(toy, stage, tmp_path, *flags)
    argv[argv.index("--global_batch_size") + 1], argv[argv.index("--batch_size") + 1] = "8", "4"
    llava_kd.main(argv)
    saved, init = weights(tmp_path), weights(student_dir)  # the student's own tower, kept
    assert all(torch.equal(saved[k], init[k]) for k in init if "vision_tower." in k)
    (rec,) = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    # the step's samples, in the loop's order, through the loop's own processor set-up
    model, proc = models.load_llava(student_dir)
    chat.prepare_chat(proc, model.generation_config, "student", end_is_eos=stage == "dft")
    teacher = transformers.LlavaForConditionalGeneration.from_pretrained(teacher_dir)
    ds = data.LlavaDataset(
        argv[argv.index("--data") + 1],
        f"{toy}/data/images",
        proc,
        chat=stage == "dft",
        max_length=2048,
    )
    sampler = torch.utils.data.DistributedSampler(ds, 1, 0, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(0)
    rows = [ds[i] for i in list(sampler)[:8]]
    b = data.collate(rows, proc.tokenizer.pad_token_id)
    visual = b["input_ids"] == model.config.image_token_id
    # float64: the stock forward of each model, then the equations
    s64, t64 = copy.deepcopy(model).double(), copy.deepcopy(teacher).double()
    llava_kd.apply_stage(s64, stage)
    inputs = dict(
        input_ids=b["input_ids"],
        attention_mask=b["attention_mask"],
        pixel_values=b["pixel_values"].double(),
    )
    with torch.no_grad():
        t = t64(**inputs).logits
    ref = reference(s64(**inputs).logits, t, b["labels"], visual, b["attention_mask"])
    for k, x in zip(NAMES, ref):
        assert rec[k] == pytest.approx(float(x.detach()), rel=2e-5, abs=1e-9), k
    ref_loss = ref[0] + ref[1] + ref[2] + 0.5 * ref[3] + 0.3 * ref[4]
    assert rec["loss"] == pytest.approx(float(ref_loss.detach()), rel=2e-5)
    names = [n for n, p in s64.named_parameters() if p.requires_grad]
    want = dict(
        zip(names, torch.autograd.grad(ref_loss, [p for p in s64.parameters() if p.requires_grad]))
    )
    # the loop's gradient: its loss on the two micro-batches of 4, each divided by the whole step's
    # counts
    llava_kd.apply_stage(model, stage)
    models.share_tower(model, teacher, teacher_dir, new_student=False)  # as load_teacher does
    errors.take_notes()
    counts = [
        float(m.sum())
        for m in (
            llava_kd.response_rows(b["labels"]),
            visual,
            visual.any(1),
            llava_kd.prompt_rows(b["labels"], visual, b["attention_mask"]),
        )
    ]
    for i in (0, 4):
        mb = data.collate(rows[i : i + 4], proc.tokenizer.pad_token_id)
        student = llava_kd.Student(model, llava_kd.teacher_gram(teacher, model))
        loss, _ = llava_kd.stage_loss(student, model, teacher, mb, (1.0, 1.0, 0.5, 0.3), counts)
        loss.backward()
    got = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(got[n].grad.double(), want[n], rtol=1e-4, atol=1e-7, msg=n)


def test_lr_follows_table_a9_and_gradients_are_clipped_to_one(toy, ckpts, tmp_path, monkeypatch):
    # Table A9: warm-up over the first 3% of the steps, then cosine decay to 0; written out for 100
    # steps, peak 1e-3
    want = {
        0: 1e-3 / 3,
        1: 2e-3 / 3,
        2: 1e-3,
        3: 1e-3,
        50: 0.5e-3 * (1 + math.cos(math.pi * 47 / 97)),
        99: 0.5e-3 * (1 + math.cos(math.pi * 96 / 97)),
    }
    for step, lr in want.items():
        assert llava_kd.lr_at(step, 100, 1e-3, 0.03) == pytest.approx(lr, rel=1e-12)
    norms = []  # the gradient's norm when the optimizer steps: after clipping
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        norms.append(
            float(
                torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]]).norm()
            )
        )
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    llava_kd.main(
        args(
            toy,
            "sft",
            tmp_path,
            "--init",
            str(ckpts / "student"),
            "--max_steps",
            "3",
            "--lr",
            "1e-3",
        )
    )
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    total = len(json.load(open(f"{toy}/data/sft.json"))) // 16
    assert [r["lr"] for r in log] == pytest.approx(
        [llava_kd.lr_at(s, total, 1e-3, 0.03) for s in range(3)], rel=1e-12
    )
    for r, n in zip(log, norms):
        assert n == pytest.approx(min(r["grad_norm"], 1.0), rel=1e-5)
    # the toy's first steps are clipped: the test sees clipping act
    assert max(r["grad_norm"] for r in log) > 1


def test_resume_across_an_epoch_boundary_and_refusals(toy, ckpts, tmp_path):
    """100 samples / 16 = 6 steps an epoch: stopped at step 5, resumed into the second epoch, it
    ends where an uninterrupted run does. Another global batch, and a train_state.pt holding pickled
    code, are refused."""
    common = [
        "--init",
        str(ckpts / "student"),
        "--lr",
        "1e-3",
        "--save_every",
        "1",
        "--epochs",
        "2",
    ]
    llava_kd.main(args(toy, "sft", tmp_path / "whole", *common, "--max_steps", "8"))
    llava_kd.main(args(toy, "sft", tmp_path / "parts", *common, "--max_steps", "5"))
    llava_kd.main(args(toy, "sft", tmp_path / "parts", *common, "--max_steps", "8", "--resume"))
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7, msg=k)
    other = args(toy, "sft", tmp_path / "parts", *common, "--resume")
    other[other.index("--global_batch_size") + 1] = "8"
    with pytest.raises(SystemExit, match=r"with --global_batch_size 16 \(now 8\)"):
        llava_kd.main(other)
    path = tmp_path / "parts" / "checkpoint" / "train_state.pt"
    state = torch.load(path, weights_only=True)  # what this program writes loads as plain data
    torch.save(dict(state, hook=os.system), path)  # a shared checkpoint carrying a callable
    marker = tmp_path / "parts" / "checkpoint" / "complete.json"
    sizes = json.loads(marker.read_text())
    sizes["files"]["train_state.pt"] = os.path.getsize(path)  # shared with its sizes matching
    marker.write_text(json.dumps(sizes))
    with pytest.raises(SystemExit) as e:
        llava_kd.main(args(toy, "sft", tmp_path / "parts", *common, "--max_steps", "9", "--resume"))
    assert str(e.value).startswith(
        f"error: --resume: {path} holds more than tensors and plain values"
    )
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flag", [["--grad_checkpointing"], ["--workers", "2"]])
def test_grad_checkpointing_and_loader_workers_do_not_change_a_step(
    toy, ckpts, tmp_path, flag, monkeypatch
):
    """The same weights with either flag. --grad_checkpointing checkpoints: the student's decoder
    layers run again in backward, in train mode, while the teacher and the shared tower stay in
    eval mode (from_pretrained gives eval mode, where transformers never checkpoints)."""
    layer_calls, modes = [], []  # a decoder layer's MLP (its forward is checkpointing's wrapper)
    qwen2 = transformers.models.qwen2.modeling_qwen2
    mlp_forward = qwen2.Qwen2MLP.forward
    stage_loss = llava_kd.stage_loss

    def counted(self, *args, **kwargs):
        layer_calls.append(self)
        return mlp_forward(self, *args, **kwargs)

    def recorded(student, model, teacher, *args, **kwargs):
        tower = model.model.vision_tower
        modes.append((model.training, tower.training, teacher.training))
        return stage_loss(student, model, teacher, *args, **kwargs)

    monkeypatch.setattr(qwen2.Qwen2MLP, "forward", counted)
    monkeypatch.setattr(llava_kd, "stage_loss", recorded)
    common = [
        "--init",
        str(ckpts / "student"),
        "--teacher",
        str(ckpts / "teacher"),
        "--lr",
        "1e-3",
        "--max_steps",
        "2",
    ]
    llava_kd.main(args(toy, "dft", tmp_path / "plain", *common))
    plain_calls = len(layer_calls)
    argv = args(toy, "dft", tmp_path / "flag", *common, *flag)
    if flag[0] == "--workers":
        del argv[argv.index("--workers") : argv.index("--workers") + 2]  # only the flag's own value
    llava_kd.main(argv)
    assert modes and all(m == (True, False, False) for m in modes)  # student, tower, teacher
    student_layers = transformers.AutoConfig.from_pretrained(ckpts / "student").text_config
    recomputed = (len(layer_calls) - 2 * plain_calls) / student_layers.num_hidden_layers
    assert recomputed == (len(modes) / 2 if flag[0] == "--grad_checkpointing" else 0)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "flag")
    assert changed(a, weights(ckpts / "student"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


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
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]
    assert all((r["L_vis"] > 0) == llava_kd.STAGES[stage]["teacher"] for r in log)
    # beside the model: its log and checkpoint, no lock (the run ended) and no resume marker
    assert not {"run.lock", "complete.json", "train_state.pt"} & set(os.listdir(tmp_path))


def test_ablation_flags_turn_terms_off(toy, ckpts, tmp_path):
    extra = [
        "--init",
        str(ckpts / "student"),
        "--teacher",
        str(ckpts / "teacher"),
        "--max_steps",
        "1",
        "--beta",
        "0",
        "--gamma",
        "0",
    ]
    llava_kd.main(args(toy, "dft", tmp_path, *extra))
    (rec,) = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert rec["L_res"] > 0 and rec["L_vis"] == 0 and rec["L_rel"] == 0
    assert rec["loss"] == pytest.approx(rec["L_reg"] + rec["L_res"])


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(toy, ckpts, tmp_path):
    extra = [
        "--init",
        str(ckpts / "student"),
        "--lr",
        "1e30",
        "--save_every",
        "1",
        "--max_steps",
        "8",
    ]
    with pytest.raises(SystemExit, match=r"at step (\d+); stopped without saving") as e:
        llava_kd.main(args(toy, "sft", tmp_path, *extra))
    bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
    state = torch.load(tmp_path / "checkpoint" / "train_state.pt", weights_only=True)
    assert 1 <= state["step"] == bad_step - 1
    transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "checkpoint")
    assert not os.path.exists(tmp_path / "checkpoint.tmp")


def test_bad_flags_are_refused_with_the_flag_named(toy, ckpts, tmp_path):
    with pytest.raises(SystemExit, match="needs --teacher"):
        llava_kd.main(args(toy, "dpt", tmp_path, "--init", str(ckpts / "student")))
    with pytest.raises(
        SystemExit, match="--global_batch_size 16 must be a multiple of --batch_size 5"
    ):
        llava_kd.main(
            args(toy, "pt", tmp_path, "--init", str(ckpts / "student"), "--batch_size", "5")
        )
    with pytest.raises(SystemExit, match="--resume: no complete checkpoint in "):
        llava_kd.main(args(toy, "pt", tmp_path / "new", "--resume"))


def test_next_token_loss_equals_the_models_own_loss(toy, ckpts):
    model, proc = models.load_llava(ckpts / "student")
    ds = data.LlavaDataset(
        f"{toy}/data/sft.json", f"{toy}/data/images", proc, chat=True, max_length=256
    )
    b = data.collate([ds[i] for i in range(4)], proc.tokenizer.pad_token_id)
    out = model(
        input_ids=b["input_ids"],
        attention_mask=b["attention_mask"],
        pixel_values=b["pixel_values"],
        labels=b["labels"],
    )
    torch.testing.assert_close(llava_kd.next_token_loss(out.logits, b["labels"]), out.loss)


@pytest.mark.parametrize("stage", ["sft", "dft"])
def test_fsdp_ends_with_the_weights_of_one_process_and_resumes_exactly(toy, ckpts, tmp_path, stage):
    """--fsdp on 2 processes x 4 x 2 ends with the weights of 1 process x 8 x 2 after 2 steps (as
    DDP does: the test above), its checkpoint (gathered on rank 0) loading in stock transformers;
    stopped at step 1 and resumed under --fsdp, it ends as the uninterrupted --fsdp run does."""
    common = ["--init", str(ckpts / "student"), "--lr", "1e-3", "--save_every", "1"]
    if stage == "dft":
        common += ["--teacher", str(ckpts / "teacher")]

    def two(out, *x):  # 2 processes x 4 x 2 micro-steps
        argv = args(toy, stage, tmp_path / out, *common, *x)
        argv[argv.index("--batch_size") + 1] = "4"
        return argv

    runs = [processes(*two("fsdp", "--max_steps", "2", "--fsdp"))]
    if stage == "dft":
        runs.append(processes(*two("parts", "--max_steps", "1", "--fsdp")))
    else:  # continued by one process under DDP
        runs.append(processes(*two("to-ddp", "--max_steps", "1", "--fsdp")))
    # while those run
    llava_kd.main(args(toy, stage, tmp_path / "one", *common, "--max_steps", "2"))
    if stage == "dft":  # continued by two processes under FSDP2
        llava_kd.main(args(toy, stage, tmp_path / "to-fsdp", *common, "--max_steps", "1"))
    finish(*runs)
    one, start, fsdp = (
        weights(tmp_path / "one"),
        weights(ckpts / "student"),
        weights(tmp_path / "fsdp"),
    )
    assert max((one[k] - start[k]).abs().max() for k in one) > 1e-4
    for k in one:  # reduction order only (see the test above): a sharding bug moves weights by ~lr
        torch.testing.assert_close(fsdp[k], one[k], rtol=0, atol=1e-5, msg=k)
    stored = [safe_open(tmp_path / d / "model.safetensors", "pt").keys() for d in ("one", "fsdp")]
    assert sorted(stored[1]) == sorted(stored[0])  # the same tensors: a tied head saved once
    held = [
        json.loads(open(tmp_path / d / "log.jsonl").readlines()[-1])["trained_gib"]
        for d in ("one", "fsdp")
    ]
    # each of the 2 processes holds half the weights, gradients, AdamW state
    assert 0.45 < held[1] / held[0] < 0.55
    if stage == "dft":
        finish(processes(*two("parts", "--max_steps", "2", "--fsdp", "--resume")))
        finish(processes(*two("to-fsdp", "--max_steps", "2", "--fsdp", "--resume")))
        parts, mixed = weights(tmp_path / "parts"), weights(tmp_path / "to-fsdp")
        for k in fsdp:
            torch.testing.assert_close(parts[k], fsdp[k], rtol=0, atol=1e-7, msg=f"resumed: {k}")
            torch.testing.assert_close(mixed[k], fsdp[k], rtol=0, atol=1e-5, msg=f"DDP->FSDP2: {k}")
    else:  # a checkpoint holds the whole state: DDP goes on from FSDP2's (train.sh: NGPU 2 -> 1)
        llava_kd.main(
            args(toy, stage, tmp_path / "to-ddp", *common, "--max_steps", "2", "--resume")
        )
        mixed = weights(tmp_path / "to-ddp")
        for k in one:
            torch.testing.assert_close(mixed[k], one[k], rtol=0, atol=1e-5, msg=f"FSDP2->DDP: {k}")


def test_two_nodes_on_one_machine_end_with_the_weights_of_one_process(toy, ckpts, tmp_path):
    """Two torchrun launches, --nnodes 2, one process each, meeting on localhost: torchrun's own
    rendezvous."""
    common = ["--init", str(ckpts / "student"), "--lr", "1e-3", "--max_steps", "1"]
    port = str(29500 + os.getpid() % 1000)

    def node(r):
        return [
            "--nnodes=2",
            f"--node_rank={r}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
        ]

    argv = args(toy, "sft", tmp_path / "two", *common)  # 2 nodes x 1 process x 8 x 1 micro-step
    nodes = [torchrun(*argv, nproc=1, extra=node(r)) for r in (0, 1)]
    # 1 process x 8 x 2, while the nodes run
    llava_kd.main(args(toy, "sft", tmp_path / "one", *common))
    finish(*nodes)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert changed(one, weights(ckpts / "student"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)


def test_two_nodes_of_two_processes_shard_within_a_node_and_end_as_one_process(
    toy, ckpts, tmp_path
):
    """--fsdp on 2 nodes x 2 processes (torchrun's variables: LOCAL_WORLD_SIZE 2 of WORLD_SIZE 4):
    a 2-D mesh, parameters sharded over a node's 2 processes and replicated over the 2 nodes (so a
    step's all-gathers stay within a node); it ends with the weights of 1 process x 8 x 2."""
    common = ["--init", str(ckpts / "student"), "--lr", "1e-3", "--max_steps", "2"]
    argv = args(toy, "sft", tmp_path / "hsdp", *common, "--fsdp")
    argv[argv.index("--batch_size") + 1] = "2"  # 4 processes x 2 x 2 micro-steps
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="4", LOCAL_WORLD_SIZE="2")
    ranks = [
        dict(env, RANK=str(r), LOCAL_RANK=str(r % 2), GROUP_RANK=str(r // 2)) for r in range(4)
    ]
    procs = [launch(argv, e) for e in ranks]
    llava_kd.main(args(toy, "sft", tmp_path / "one", *common))
    outs = finish(procs)
    assert "FSDP2: sharded over 2 processes, replicated over 2 node(s)" in outs[0], outs[0]
    assert "(4 x 2 x 2)" in outs[0]
    one, hsdp = weights(tmp_path / "one"), weights(tmp_path / "hsdp")
    assert changed(one, weights(ckpts / "student"))
    for k in one:
        torch.testing.assert_close(hsdp[k], one[k], rtol=0, atol=1e-5, msg=k)
    held = [
        json.loads(open(tmp_path / d / "log.jsonl").readlines()[-1])["trained_gib"]
        for d in ("one", "hsdp")
    ]
    assert 0.45 < held[1] / held[0] < 0.55  # half of it on each process: sharded over 2, not 4


def test_a_bf16_init_trains_float32_master_weights(toy, ckpts, tmp_path):
    """--init from a bf16 checkpoint (llava-hf publishes them so): AdamW updates float32 master
    weights and the output saves them in float32. In bf16 a first step at lr 1e-5 (|update| ~ lr)
    rounds away on most weights."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(ckpts / "student")
    processor = transformers.AutoProcessor.from_pretrained(ckpts / "student")
    checkpoints.save_checkpoint_files(model.to(torch.bfloat16), processor, tmp_path / "bf16")
    init = ["--init", str(tmp_path / "bf16"), "--lr", "1e-5", "--max_steps", "1"]
    llava_kd.main(args(toy, "sft", tmp_path / "out", *init))
    start, end = weights(tmp_path / "bf16"), weights(tmp_path / "out")
    llm = [k for k in end if k.startswith("model.language_model.layers.")]
    assert all(start[k].dtype == torch.bfloat16 and end[k].dtype == torch.float32 for k in llm)
    moved = torch.cat([(end[k] != start[k].float()).flatten() for k in llm]).float().mean()
    assert moved > 0.9


def mixed_precision_leaves_m_t_in_float32(toy, ckpts):
    model, processor = models.load_llava(ckpts / "student", torch.float32)
    teacher, _ = models.load_llava(ckpts / "teacher", torch.float32)
    teacher.eval().requires_grad_(False)
    llava_kd.apply_stage(model, "dft")
    m_t = llava_kd.teacher_gram(teacher, model)
    seen = []
    fused_loss = llava_kd.fused_loss

    def recording(*args, **kwargs):
        seen.append(kwargs["m_t"].dtype)
        return fused_loss(*args, **kwargs)

    llava_kd.fused_loss = recording  # in the forked process alone
    student = procs.shard(llava_kd.Student(model, m_t), model, bf16=True)
    ds = data.LlavaDataset(
        f"{toy}/data/sft.json", f"{toy}/data/images", processor, chat=True, max_length=512
    )
    b = data.collate([ds[i] for i in range(2)], processor.tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        llava_kd.stage_loss(student, model, teacher, b)
    assert seen == [torch.float32]
    print("passed")


def test_fsdp_mixed_precision_leaves_m_t_in_float32(toy, ckpts):
    """FSDP2's bf16 policy (as on CUDA) casts every floating input of the student's forward to
    bf16. The teacher's W^T W is held by the Student, so the loss still gets it in float32."""
    alone(mixed_precision_leaves_m_t_in_float32, toy, ckpts)


def test_table_a9_is_what_the_loop_uses(toy, ckpts, tmp_path, monkeypatch):
    """Table A9 written out: lr 1e-3 (pt, dpt) and 2e-5 (sft, dft), global batch 256 and 128, one
    epoch, 3% warm-up, no weight decay, gradients clipped at norm 1. A run without --lr logs Table
    A9's lr (the toy's 6 steps warm up in 1), and AdamW gets weight decay 0."""
    paper = {"pt": (1e-3, 256), "dpt": (1e-3, 256), "sft": (2e-5, 128), "dft": (2e-5, 128)}
    for stage, (lr, batch) in paper.items():
        row = dict(lr=lr, global_batch=batch, epochs=1, warmup_ratio=0.03, weight_decay=0, clip=1)
        assert llava_kd.TABLE_A9[stage] == row
    made = []
    adamw = torch.optim.AdamW

    def recorded(params, **kwargs):
        made.append(kwargs)
        return adamw(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recorded)
    llava_kd.main(args(toy, "sft", tmp_path, "--init", str(ckpts / "student"), "--max_steps", "1"))
    assert [(m["lr"], m["weight_decay"]) for m in made] == [(2e-5, 0)]
    (rec,) = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert rec["lr"] == 2e-5


def test_the_teacher_runs_without_autograd(toy, ckpts, tmp_path, monkeypatch):
    """The teacher's forward records no graph (torch.no_grad); the student's does."""
    calls = []
    llava_hidden = llava_kd.llava_hidden

    def recorded(model, *args, **kwargs):
        calls.append((model.training, torch.is_grad_enabled()))
        return llava_hidden(model, *args, **kwargs)

    monkeypatch.setattr(llava_kd, "llava_hidden", recorded)
    extra = ["--init", str(ckpts / "student"), "--teacher", str(ckpts / "teacher")]
    llava_kd.main(args(toy, "dft", tmp_path, *extra, "--max_steps", "1"))
    # the teacher in eval mode, the student in train mode: one call each a micro-step
    assert sorted(set(calls)) == [(False, False), (True, True)]


def test_a_crash_while_saving_keeps_the_last_checkpoint(toy, ckpts, tmp_path, monkeypatch):
    """A save that fails half-way (here: train_state.pt, after the weights were written) leaves the
    previous checkpoint whole: its weights and its step."""
    common = ["--init", str(ckpts / "student"), "--lr", "1e-3", "--save_every", "1"]
    llava_kd.main(args(toy, "sft", tmp_path / "one", *common, "--max_steps", "1"))
    saves = []
    save = torch.save

    def failing(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) == 2:
            raise OSError(5, "Input/output error")  # not a full disk: raised as it is
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(OSError):
        llava_kd.main(args(toy, "sft", tmp_path / "crash", *common, "--max_steps", "2"))
    kept, want = (
        weights(tmp_path / "crash" / "checkpoint"),
        weights(tmp_path / "one" / "checkpoint"),
    )
    for k in want:
        torch.testing.assert_close(kept[k], want[k], rtol=0, atol=0, msg=k)
    state = torch.load(tmp_path / "crash" / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 1


@pytest.mark.parametrize(
    "stage,fsdp", [("pt", False), ("sft", False), ("sft", True), ("dft", True)]
)
def test_a_process_whose_micro_batches_are_all_text_only(toy, ckpts, tmp_path, stage, fsdp):
    """2 processes x 4 x 2, rank 1 drawing only text-only samples, rank 0 mostly samples with an
    image: rank 1's micro-batches leave the projector without a use, and DDP's buckets and FSDP2's
    reduce-scatters must still be the same on both ranks (else gloo: an error; NCCL: a hang). Both
    processes end; the projector learns from rank 0's images, the LLM from both."""
    source = "pretrain" if stage == "pt" else "sft"
    rows = json.load(open(f"{toy}/data/{source}.json"))[:32]
    sampler = torch.utils.data.DistributedSampler(range(32), 2, 1, shuffle=True, seed=0)
    for i in list(sampler):  # rank 1's samples of epoch 0, as the loop draws them
        rows[i].pop("image", None)
        for turn in rows[i]["conversations"]:
            turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
    (tmp_path / "text.json").write_text(json.dumps(rows))
    extra = ["--init", str(ckpts / "student"), "--max_steps", "2", "--lr", "1e-3"]
    if stage == "dft":
        extra += ["--teacher", str(ckpts / "teacher")]
    argv = args(toy, stage, tmp_path / "two", *extra, *(["--fsdp"] if fsdp else []))
    argv[argv.index("--data") + 1] = str(tmp_path / "text.json")
    argv[argv.index("--batch_size") + 1] = "4"
    finish(processes(*argv))
    start, end = weights(ckpts / "student"), weights(tmp_path / "two")
    projector = [k for k in end if "multi_modal_projector" in k]
    assert changed({k: end[k] for k in projector}, {k: start[k] for k in projector})
    if stage != "pt":
        llm = [k for k in end if k.startswith("model.language_model.layers.")]
        assert changed({k: end[k] for k in llm}, {k: start[k] for k in llm})


def test_no_kv_cache_is_built_in_a_step(toy, ckpts, tmp_path, monkeypatch):
    """Neither the teacher's nor the student's forward builds a KV cache (checkpointing off: the
    student's is not turned off by it): a DynamicCache would hold every layer's keys and values
    until the forward returns, ~400 KB a token for Qwen1.5-4B."""
    qwen2 = transformers.models.qwen2.modeling_qwen2
    made = []

    class Counted(qwen2.DynamicCache):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(qwen2, "DynamicCache", Counted)
    model = transformers.AutoModelForCausalLM.from_pretrained(f"{toy}/student_llm")
    model(torch.tensor([[1, 2, 3]]))  # the count is live: a stock forward builds one
    assert made == [1]
    made.clear()
    extra = ["--init", str(ckpts / "student"), "--teacher", str(ckpts / "teacher")]
    llava_kd.main(args(toy, "dft", tmp_path, *extra, "--max_steps", "1"))
    assert made == []


def test_the_shared_tower_is_the_stored_float32_one_beside_a_bf16_teacher(ckpts):
    """On CUDA the teacher loads in bf16; the vision tower it shares with the student (which trains
    beside it and saves it) stays the float32 one of the teacher's checkpoint, bit for bit."""
    source = transformers.LlavaForConditionalGeneration.from_pretrained(ckpts / "teacher")
    student, processor = models.load_llava(ckpts / "student", torch.float32)
    teacher = models.load_teacher(ckpts / "teacher", student, processor, torch.bfloat16)
    assert teacher.model.language_model.dtype == torch.bfloat16
    assert student.model.vision_tower is teacher.model.vision_tower
    shared = student.model.vision_tower.state_dict()
    for k, v in source.model.vision_tower.state_dict().items():
        assert shared[k].dtype == torch.float32 and torch.equal(shared[k], v), k
    assert not any(p.requires_grad for p in shared.values())


def test_resume_maps_the_train_state_instead_of_reading_it(toy, ckpts, tmp_path):
    """--resume's train_state.pt (the AdamW state: ~32 GB for a 4B model, on each of 8 processes)
    is mapped from the file, whose pages the processes share, not read into each one's memory."""
    extra = ["--init", str(ckpts / "student"), "--max_steps", "1"]
    llava_kd.main(args(toy, "sft", tmp_path, *extra))
    path = str(tmp_path / "checkpoint" / "train_state.pt")
    state = checkpoints.read_train_state(path)
    assert state["step"] == 1 and state["optimizer"]["state"]
    assert path in open("/proc/self/maps").read()


def test_the_student_makes_its_heads_gram_once_an_optimizer_step(toy, ckpts, monkeypatch):
    """W_s^T W_s is made at a step's first micro-step and reused for the rest of the step; a
    trained head's again at the next step, so that L_rel is that of the head as it is then; a
    frozen head's (dpt) once a run."""
    model, processor = models.load_llava(ckpts / "student", torch.float32)
    teacher, _ = models.load_llava(ckpts / "teacher", torch.float32)
    teacher.eval().requires_grad_(False)
    made = []
    head_gram = llava_kd.head_gram
    monkeypatch.setattr(llava_kd, "head_gram", lambda w: made.append(1) or head_gram(w))
    ds = data.LlavaDataset(
        f"{toy}/data/sft.json", f"{toy}/data/images", processor, chat=True, max_length=512
    )
    b = data.collate([ds[i] for i in range(2)], processor.tokenizer.pad_token_id)
    for stage, want in (("dft", [1, 0, 1, 0]), ("dpt", [1, 0, 0, 0])):
        llava_kd.apply_stage(model, stage)
        student = llava_kd.Student(model, llava_kd.teacher_gram(teacher, model))
        calls = []
        for step in (0, 0, 1, 1):
            if step == 1 and stage == "dft":
                with torch.no_grad():  # the optimizer's step
                    model.lm_head.weight.mul_(1.5)
            made.clear()
            _, terms = llava_kd.stage_loss(student, model, teacher, b, step=step)
            calls.append(len(made))
            fresh = llava_kd.stage_loss(llava_kd.Student(model, student.m_t), model, teacher, b)
            torch.testing.assert_close(terms["L_rel"], fresh[1]["L_rel"])
        assert calls == want, stage


@pytest.mark.parametrize("stage", ["dpt", "dft"])
def test_a_teacher_sharded_under_fsdp_gives_the_losses_and_weights_of_a_whole_one(
    toy, ckpts, tmp_path, stage
):
    """--fsdp on 2 processes shards the frozen teacher's layers too: every step's loss and terms
    and the student's weights after 3 steps are those of one process, whose teacher is whole."""
    common = ["--teacher", str(ckpts / "teacher"), "--lr", "1e-3", "--max_steps", "3"]
    common += ["--init", str(ckpts / "student")] if stage == "dft" else []
    if stage == "dpt":
        common += ["--vision", f"{toy}/vision", "--llm", f"{toy}/student_llm"]
    two = args(toy, stage, tmp_path / "two", *common, "--fsdp")
    two[two.index("--batch_size") + 1] = "4"  # 2 processes x 4 x 2 micro-steps
    run = processes(*two)
    llava_kd.main(args(toy, stage, tmp_path / "one", *common))
    assert "the teacher's layers too" in finish(run)[0]
    logs = [[json.loads(x) for x in open(tmp_path / d / "log.jsonl")] for d in ("one", "two")]
    for a, b in zip(*logs, strict=True):
        for k in ("loss", *llava_kd.TERMS):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)
    one, sharded = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(sharded[k], one[k], rtol=0, atol=1e-5, msg=k)


def teacher_sharded(ckpts, toy):
    from torch.distributed.tensor import DTensor

    model, processor = models.load_llava(ckpts / "student", torch.float32)
    teacher, _ = models.load_llava(ckpts / "teacher", torch.float32)
    teacher.eval().requires_grad_(False)
    ds = data.LlavaDataset(
        f"{toy}/data/sft.json", f"{toy}/data/images", processor, chat=True, max_length=512
    )
    b = data.collate([ds[i] for i in range(4)], processor.tokenizer.pad_token_id)
    z_v = llava_kd.vision_features(teacher, b["pixel_values"])
    whole = llava_kd.llava_hidden(teacher, b["input_ids"], b["attention_mask"], z_v)
    procs.shard(llava_kd.Student(model), model, bf16=False, teacher=teacher)
    llm = teacher.model.language_model
    layer_weights = [p for layer in llm.layers for p in layer.parameters()]
    assert layer_weights and all(isinstance(p, DTensor) for p in layer_weights)
    kept = [
        llm.embed_tokens.weight,
        teacher.lm_head.weight,
        *teacher.model.vision_tower.parameters(),
    ]
    assert not any(isinstance(p, DTensor) for p in kept)  # read outside the LLM's forward
    with torch.no_grad():
        sharded = llava_kd.llava_hidden(teacher, b["input_ids"], b["attention_mask"], z_v)
    torch.testing.assert_close(sharded, whole)
    after = [p for layer in llm.layers for p in layer.parameters()]
    assert all(isinstance(p, DTensor) for p in after)  # sharded again after its forward
    print("passed")


def test_fsdp_shards_the_teacher_layers_and_leaves_what_is_read_outside_its_llm_whole(toy, ckpts):
    """The teacher's decoder layers DTensors (gathered in its forward, which gives what the whole
    teacher gives, and sharded again after); embeddings, head and the shared tower plain tensors."""
    alone(teacher_sharded, ckpts, toy)
