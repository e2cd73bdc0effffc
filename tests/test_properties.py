"""Properties that a copier of the losses, a refactor of the loop or a slip in a file could break
without any other test seeing it: each one is broken on purpose once to see its test fail."""

import json
import os
import subprocess

import pytest
import test_convert
import torch
from conftest import ROOT, alone, args, changed, weights

import chat
import checkpoints
import convert_tinyllava
import data
import errors
import flags
import llava_kd
import memory
import models
import processes
from test_losses import batch


def test_every_spec_loss_divides_by_the_count_it_is_given():
    """Micro-batches, each divided by the whole batch's count, add up to the batch: for each spec
    function alone (a copier takes one of them, not distill_loss)."""
    h_s, w_s, h_t, w_t, labels, visual, _ = batch(B=4)
    s, t = (h_s @ w_s.T).detach(), (h_t @ w_t.T).detach()
    answers = llava_kd.response_rows(labels).sum()
    images = visual.any(1).sum()
    calls = [
        (lambda i, n: llava_kd.next_token_loss(s[i], labels[i], n), answers),
        (lambda i, n: llava_kd.response_loss(s[i], t[i], labels[i], n), answers),
        (lambda i, n: llava_kd.visual_loss(s[i], t[i], visual[i], n), visual.sum()),
        (lambda i, n: llava_kd.relation_loss(s[i], t[i], visual[i], n), images),
    ]
    parts = (slice(0, 1), slice(1, 4))  # of different counts
    for loss, count in calls:
        whole = loss(slice(0, 4), None)
        torch.testing.assert_close(sum(loss(i, count) for i in parts), whole)
        # and a count that is not the micro-batch's own changes the value
        assert not torch.allclose(loss(parts[0], count), loss(parts[0], None))


def test_fused_loss_of_bf16_inputs_without_autocast_accumulates_in_float32():
    """bf16 hidden states and heads, no autocast: the GEMMs are bf16, all after them float32. The
    loss equals float64 math on the same bf16 logits to float32's precision (bf16 math: ~1e-2)."""
    h_s, w_s, h_t, w_t, labels, visual, attention = batch(B=3, T=20, Vs=300, Vt=300)
    hb, wb = h_s.detach().bfloat16().requires_grad_(), w_s.detach().bfloat16().requires_grad_()
    htb, wtb = h_t.bfloat16(), w_t.bfloat16()
    kw = dict(delta=0.3, attention_mask=attention, block=300)  # a row a block: 40 blocks summed
    loss, terms = llava_kd.fused_loss(hb, wb, labels, visual, htb, wtb, **kw)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())
    s64 = (hb @ wb.T).double().detach().requires_grad_()  # the bf16 GEMM's own logits
    t64 = (htb @ wtb.T).double()
    # L_rel from the float64 logits of the bf16 inputs (the lean path forms R from H W^T W)
    want, want_terms = llava_kd.distill_loss(
        s64, t64, labels, visual, delta=0.3, attention_mask=attention
    )
    want = want + llava_kd.next_token_loss(s64, labels)
    for name in ("L_res", "L_vis", "L_pro"):
        torch.testing.assert_close(terms[name].double(), want_terms[name], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(
        terms["L_reg"].double(),
        want
        - sum(
            w * want_terms[k]
            for k, w in (("L_res", 1), ("L_vis", 1), ("L_rel", 0.5), ("L_pro", 0.3))
        ),
        rtol=2e-6,
        atol=1e-7,
    )
    (g_w,) = torch.autograd.grad(loss, wb)
    assert g_w.dtype == torch.bfloat16
    # dL/dW summed over 40 blocks in float32, rounded to bf16 once
    (g64,) = torch.autograd.grad(want - 0.5 * want_terms["L_rel"], s64)
    ref = (g64.flatten(0, 1).T @ hb.detach().double().flatten(0, 1)).float()
    err = (g_w.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05  # L_rel's share (left out of ref) is small at these shapes


def test_each_epoch_is_a_new_shuffle_of_the_samples(toy, ckpts, tmp_path, monkeypatch):
    seen = []
    collate = data.collate

    def recording(rows, pad_token_id):
        seen.extend(r["id"] for r in rows)
        return collate(rows, pad_token_id)

    monkeypatch.setattr(data, "collate", recording)
    argv = args(toy, "sft", tmp_path / "o", "--init", str(ckpts / "student"), "--epochs", "2")
    llava_kd.main(argv + ["--max_length", "512"])
    n = len(seen) // 2  # 6 steps of 16 an epoch
    first, second = seen[:n], seen[n:]
    assert n == 96 and len(set(first)) == len(set(second)) == n  # each sample once an epoch
    assert first != second  # reshuffled
    # and what set_epoch gives: another order of the same kind
    assert sorted(first) != first


def fsdp2_policy(ckpts):
    from torch.distributed.fsdp import FSDPModule

    model, _ = models.load_llava(ckpts / "student", torch.float32)
    student = processes.shard(llava_kd.Student(model), model, bf16=True)
    modules = [m for m in student.modules() if isinstance(m, FSDPModule)]
    assert len(modules) == len(model.model.language_model.layers) + 1
    for m in modules:
        policy = m._get_fsdp_state()._mp_policy
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    print("passed")


def test_the_fsdp2_policy_gathers_bf16_and_reduces_float32(ckpts):
    """The policy the loop builds on CUDA (bf16=True), read back from every FSDP module."""
    alone(fsdp2_policy, ckpts)


@pytest.mark.parametrize(
    "global_batch, batch_size, world, ok",
    [
        (16, 8, 1, True),
        (16, 4, 2, True),
        (24, 4, 3, True),
        (16, 3, 1, False),
        (16, 4, 3, False),
        (12, 8, 1, False),
        (8, 8, 2, False),
    ],
)
def test_a_global_batch_not_a_multiple_of_batch_size_times_processes_is_refused(
    toy, ckpts, tmp_path, global_batch, batch_size, world, ok
):
    argv = args(toy, "sft", tmp_path / "o", "--init", str(ckpts / "student"))
    argv[argv.index("--global_batch_size") + 1] = str(global_batch)
    argv[argv.index("--batch_size") + 1] = str(batch_size)
    parser_args = parse(argv)
    stage = llava_kd.STAGES["sft"]
    if ok:
        got = flags.check_flags(parser_args, world, stage, llava_kd.TABLE_A9["sft"])
        assert got == global_batch  # never rounded
    else:
        with pytest.raises(
            errors.UserError, match=f"must be a multiple of --batch_size {batch_size}"
        ):
            flags.check_flags(parser_args, world, stage, llava_kd.TABLE_A9["sft"])


def parse(argv):
    """The namespace llava_kd.main would train with."""
    seen = {}

    def keep(a):
        seen["a"] = a

    real = llava_kd.train
    llava_kd.train = keep
    try:
        llava_kd.main(argv)
    finally:
        llava_kd.train = real
    return seen["a"]


def test_a_checkpoint_is_complete_only_with_every_file_it_wrote(ckpts, tmp_path):
    model, proc = models.load_llava(ckpts / "student", torch.float32)
    state = dict(step=3, optimizer={"w": torch.ones(1000)}, args={})
    checkpoints.save_checkpoint(model, proc, state, str(tmp_path))
    ckpt = tmp_path / "checkpoint"
    listed = json.load(open(ckpt / checkpoints.COMPLETE))["files"]
    assert set(listed) == set(os.listdir(ckpt)) - {checkpoints.COMPLETE}
    assert "train_state.pt" in listed and "model.safetensors" in listed
    assert checkpoints.checkpoint_problem(str(ckpt)) is None
    for name in ("train_state.pt", "model.safetensors", "config.json"):
        size = os.path.getsize(ckpt / name)
        os.truncate(ckpt / name, size - 1)
        assert f"{ckpt / name} has {size - 1} bytes where the save wrote {size}" == (
            checkpoints.checkpoint_problem(str(ckpt))
        )
        with open(ckpt / name, "ab") as f:
            f.write(b"\0")  # the size back (the content no longer matters here)


def fake_checkpoint(path, step):
    os.makedirs(path)
    (path / "train_state.pt").write_bytes(b"x" * step)
    sizes = {"train_state.pt": step}
    (path / checkpoints.COMPLETE).write_text(json.dumps(dict(step=step, files=sizes)))


@pytest.mark.parametrize(
    "present, newest",
    [
        ({"checkpoint.tmp": 5, "checkpoint.old": 4}, "checkpoint.tmp"),  # crashed between renames
        ({"checkpoint.old": 4, "checkpoint.tmp": 5}, "checkpoint.tmp"),
        ({"checkpoint": 6, "checkpoint.old": 5}, "checkpoint"),
        ({"checkpoint": 5, "checkpoint.tmp": 6}, "checkpoint.tmp"),
        ({"checkpoint": 4, "checkpoint.old": 7}, "checkpoint.old"),
    ],
)
def test_resume_takes_the_newest_complete_checkpoint(tmp_path, present, newest):
    for name, step in present.items():
        fake_checkpoint(tmp_path / name, step)
    assert checkpoints.find_checkpoint(str(tmp_path)) == str(tmp_path / newest)
    os.remove(tmp_path / newest / checkpoints.COMPLETE)  # torn: the next newest
    rest = {n: s for n, s in present.items() if n != newest}
    assert checkpoints.find_checkpoint(str(tmp_path)) == str(tmp_path / max(rest, key=rest.get))


def test_each_row_of_the_memory_plan_is_its_formula(ckpts):
    s, t = memory.meta_llava(str(ckpts / "student")), memory.meta_llava(str(ckpts / "teacher"))
    llava_kd.apply_stage(s, "dft")
    tower = sum(p.numel() for p in s.model.vision_tower.parameters())
    rest = sum(p.numel() for p in s.parameters()) - tower
    trained = sum(p.numel() for p in s.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in t.parameters()) - sum(
        p.numel() for p in t.model.vision_tower.parameters()
    )
    D_t = t.config.text_config.hidden_size
    D = s.config.text_config.hidden_size
    for cuda, fsdp, world, per_node in [
        (False, False, 1, 1),
        (True, False, 8, 8),
        (True, True, 8, 8),
        (True, True, 16, 8),
    ]:
        rows = memory.memory_plan(s, t, 2, 256, world, cuda, fsdp, 0.5, per_node, accum=2)
        got = {what: b for what, b, _ in rows}
        shards = per_node if fsdp else 1
        assert got["student weights, float32 (vision tower whole)"] == 4 * rest / shards + 4 * tower
        assert got["gradients, float32"] == 4 * trained / shards
        assert got["AdamW moments, float32"] == 8 * trained / shards
        layers = t.model.language_model.layers
        sharded = sum(p.numel() for p in layers.parameters()) if fsdp else 0  # FSDP2's layers
        whole = (frozen - sharded + sharded / shards) * (2 if cuda else 4)
        assert got["teacher, frozen (tower: the student's; FSDP2: layers sharded)"] == whole
        assert got["W^T W of both heads"] == 4 * (D_t**2 + D**2)
        when = {what: w for what, _, w in rows}
        assert when["gradients, float32"] == "held"  # accum 2: kept through the micro-steps
        # the total: held + the larger of forward and step; on CUDA 10% for fragmentation
        held = sum(b for _, b, w in rows if w == "held")
        peaks = [
            sum(b for what, b, w in rows if w == when and not what.endswith("on"))
            for when in ("forward", "step")
        ]
        total = (held + max(peaks)) * (1.1 if cuda else 1.0)
        assert memory.plan_total(rows, False, cuda) == pytest.approx(total, rel=1e-12)
    no_gram = memory.memory_plan(s, t, 2, 256, 1, False, False, 0.0)
    assert dict((w, b) for w, b, _ in no_gram)["W^T W of both heads"] == 0


def test_the_converter_pads_an_untied_head_as_it_pads_the_embeddings(toy, tmp_path, monkeypatch):
    """A source whose vocabulary has no row for <image>: both the embeddings and an untied head get
    one (zero), and the logits of every other token are the source's."""
    n = len(test_convert.tinyllava_tokenizer(toy))  # the rows the source has: none for <image>
    monkeypatch.setitem(test_convert.QWEN2, "vocab_size", n)
    monkeypatch.setitem(test_convert.QWEN2, "tie_word_embeddings", False)
    test_convert.write_tinyllava(tmp_path / "src", toy, False, tied=False)
    convert_tinyllava.convert(str(tmp_path / "src"), str(tmp_path / "out"), None)
    import transformers

    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert not model.config.tie_word_embeddings and emb.data_ptr() != head.data_ptr()
    assert emb.shape[0] == head.shape[0] == n + 1 == model.config.text_config.vocab_size
    assert not head[n:].any() and not emb[n:].any() and head[:n].abs().sum() > 0


def test_the_length_check_is_exact_at_the_boundary(toy, ckpts):
    """The first answer token at position max_length - 1 fits (and is trained); at max_length it
    does not. The last at max_length - 1: whole; at max_length: cut short (a note)."""
    model, proc = models.load_llava(ckpts / "student", torch.float32)
    chat.prepare_chat(proc, model.generation_config, str(ckpts / "student"), True)
    sample = json.load(open(f"{toy}/data/sft.json"))[0]
    ds = data.LlavaDataset(
        f"{toy}/data/sft.json", f"{toy}/data/images", proc, chat=True, max_length=4096
    )
    ds.rows = [ds.rows[0]]
    item = ds[0]
    answer = (item["labels"] != data.IGNORE).nonzero().flatten()
    first, last = int(answer[0]), int(answer[-1])  # with the image tokens in place
    for max_length, refused, cut in [
        (first, True, False),
        (first + 1, False, True),
        (last, False, True),
        (last + 1, False, False),
    ]:
        ds.max_length = max_length
        errors.take_notes()
        if refused:
            with pytest.raises(errors.UserError, match=f"{sample['id']} \\(needs {first + 1}\\)"):
                ds.check_lengths()
            continue
        ds.check_lengths()
        assert bool(errors.take_notes()) == cut, max_length
        assert (ds[0]["labels"] != data.IGNORE).sum() >= 1  # what the check let in trains
    errors.take_notes()


def test_padding_is_never_an_answer_nor_attended(toy, ckpts):
    """collate right-pads: padded positions carry -100 labels, the pad id and attention 0, so no
    loss row ever predicts or attends padding, whatever the pad id."""
    model, proc = models.load_llava(ckpts / "student", torch.float32)
    ds = data.LlavaDataset(
        f"{toy}/data/sft.json", f"{toy}/data/images", proc, chat=True, max_length=512
    )
    rows = [ds[i] for i in range(4)]
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) > 1  # padding is there
    b = data.collate(rows, pad_token_id=7)
    for i, n in enumerate(lengths):
        assert (b["labels"][i, n:] == data.IGNORE).all() and (b["input_ids"][i, n:] == 7).all()
        assert (b["attention_mask"][i, :n] == 1).all() and (b["attention_mask"][i, n:] == 0).all()
        assert torch.equal(b["labels"][i, :n], rows[i]["labels"])
    answer = llava_kd.response_rows(b["labels"])
    assert not (answer & ~b["attention_mask"].bool()).any()


def test_the_toy_recipe_chains_its_stages(tmp_path):
    """train.sh's toy branch, recorded by a stand-in Python: every student stage starts from the
    stage its row names, and the distilled ones learn from the SFT'd teacher."""
    record = tmp_path / "commands"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {record}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "O"), SEEDS="3", NGPU="1")
    subprocess.run(["bash", "train.sh"], cwd=ROOT, env=env, capture_output=True)  # no results
    stages = {}
    for line in record.read_text().splitlines():
        if " train --stage " in line:
            words = line.replace(f"{tmp_path}/O/", "").split()
            flag = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
            stages[flag["--out"]] = (flag["--stage"], flag.get("--init"), flag.get("--teacher"))
    K = "teacher-pt-sft"
    assert stages == {
        "teacher-pt": ("pt", None, None),
        "teacher-pt-sft": ("sft", "teacher-pt", None),
        "seed3/pt": ("pt", None, None),
        "seed3/pt-sft": ("sft", "seed3/pt", None),
        "seed3/pt-sft-sft": ("sft", "seed3/pt-sft", None),
        "seed3/dpt": ("dpt", None, K),
        "seed3/dpt-sft": ("sft", "seed3/dpt", None),
        "seed3/dpt-sft-dft": ("dft", "seed3/dpt-sft", K),
        "seed3/pt-sft-dft": ("dft", "seed3/pt-sft", K),
    }


def test_the_traffic_bench_counts_a_products_flops_and_bytes_and_views_as_free():
    """A product's inputs and output, its FLOPs by its operands' dtype; a view and an allocation
    move nothing; an out= tensor is written once, not read."""
    from bench import bench_loss_traffic

    a, b = torch.randn(4, 3), torch.randn(3, 5)
    counter = bench_loss_traffic.Traffic(bench_loss_traffic.GPUS["h100"])
    with counter:
        (a @ b).t()  # a view after the product
        out = torch.empty(4, 5)  # an allocation
        torch.mm(a, b, out=out)
    mm = [
        2,
        2 * (12 + 15 + 20) * 4,
        2 * 2 * 4 * 3 * 5,
        pytest.approx(2 * max(120 / 67e12, 188 / 2.9e12)),
    ]
    assert dict(counter.ops) == {"mm": mm, "empty": [1, 0, 0, 0.0]}


def test_attn_implementation_reaches_both_models(toy, ckpts, tmp_path, monkeypatch):
    seen = []
    loaded = models.from_pretrained_checked

    def recording(cls, path, attn="sdpa", **kwargs):
        model = loaded(cls, path, attn, **kwargs)
        seen.append((str(path), model.config.text_config._attn_implementation))
        return model

    monkeypatch.setattr(models, "from_pretrained_checked", recording)
    student, teacher = str(ckpts / "student"), str(ckpts / "teacher")
    argv = args(toy, "dft", tmp_path / "o", "--init", student, "--teacher", teacher)
    llava_kd.main(argv + ["--max_steps", "1", "--attn_implementation", "eager"])
    assert sorted(seen) == [(student, "eager"), (teacher, "eager")]
    with pytest.raises(SystemExit, match="flash_attention_2 needs the flash-attn package"):
        llava_kd.main(argv + ["--attn_implementation", "flash_attention_2"])


@pytest.mark.parametrize("grouped", [False, True])
def test_each_epoch_takes_every_sample_once_in_whole_steps_on_every_process(toy, ckpts, grouped):
    """epoch_order on 3 processes, as the loop slices it: floor(N / global batch) steps, every
    sample in at most one; the same seed and epoch, the same order (resume); another epoch,
    another. Grouped: one kind a step (image or text-only) but for one mixed step of what is left,
    and the same micro-step on every process takes neighbours in length."""
    _, proc = models.load_llava(ckpts / "student", torch.float32)
    ds = data.LlavaDataset(f"{toy}/data/sft.json", f"{toy}/data/images", proc, True, 512)
    for i in range(0, len(ds.rows), 4):  # every 4th text-only
        ds.rows[i] = (ds.rows[i][0], None, ds.rows[i][2])
    G, B, world = 12, 2, 3  # 2 micro-steps of 2 a process
    steps, per_step = len(ds) // G, G // world

    def order(epoch):
        return [
            data.epoch_order(ds, G, B, world, r, 0, epoch, grouped)[: steps * per_step]
            for r in range(world)
        ]

    orders = order(1)
    assert orders == order(1) and orders != order(2)
    every = [i for o in orders for i in o]
    assert len(set(every)) == len(every) == steps * G
    if not grouped:
        return

    def length(i):  # epoch_order's estimate
        _, image, conv = ds.rows[i]
        return sum(len(t["value"]) for t in conv) // 4 + (image is not None) * ds.n_image_tokens

    kinds = []
    for s in range(steps):
        step = [o[s * per_step : (s + 1) * per_step] for o in orders]
        kinds.append({ds.rows[i][1] is None for part in step for i in part})
        first, second = (
            [length(i) for p in step for i in p[:B]],
            [length(i) for p in step for i in p[B:]],
        )
        assert min(first) >= max(second)
    assert sum(len(k) > 1 for k in kinds) <= 1


def test_grouped_micro_batches_resume_exactly_across_an_epoch(toy, ckpts, tmp_path):
    common = ["--init", str(ckpts / "student"), "--group_by_length", "--epochs", "2"]
    llava_kd.main(args(toy, "sft", tmp_path / "whole", *common, "--max_steps", "8"))
    llava_kd.main(args(toy, "sft", tmp_path / "parts", *common, "--max_steps", "5"))
    llava_kd.main(args(toy, "sft", tmp_path / "parts", *common, "--max_steps", "8", "--resume"))
    assert not changed(weights(tmp_path / "whole"), weights(tmp_path / "parts"))
    shuffled = tmp_path / "shuffled"
    llava_kd.main(
        args(
            toy,
            "sft",
            shuffled,
            "--init",
            str(ckpts / "student"),
            "--max_steps",
            "8",
            "--epochs",
            "2",
        )
    )
    assert changed(weights(tmp_path / "whole"), weights(shuffled))  # grouping changes the order


def test_loader_workers_are_the_process_share_of_its_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data.loader_workers(None) == 7  # 64 CPUs over 8 processes, less the process's own
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert data.loader_workers(None) == 8  # at most 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert data.loader_workers(None) == 0  # one CPU: the process loads its own batches
    assert data.loader_workers(3) == 3  # --workers
