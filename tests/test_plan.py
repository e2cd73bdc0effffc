"""The memory plan: its activation constants measured again, and a run that would not fit stopped
before any weight loads, with what would fit named."""

import argparse
import contextlib

import pytest
import torch
import transformers
from conftest import args, finish, processes

import errors
import llava_kd
import memory


def saved_bytes(layers, dtype, hidden=64, intermediate=176, tokens=96):
    """Bytes a tiny Qwen2's forward saves for backward (its parameters and their casts aside)."""
    cfg = transformers.Qwen2Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=layers,
        vocab_size=32,
    )
    cfg._attn_implementation = "sdpa"
    model = transformers.Qwen2Model(cfg)
    storages = {}

    def pack(t):
        if tokens in t.shape:  # activations have a token dimension; weights and their casts don't
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, hidden, requires_grad=True)
    mask = torch.ones(1, tokens, dtype=torch.long)
    mask[0, -5:] = 0  # padding: the 4-D mask is built, as in a padded micro-batch
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast if dtype == torch.bfloat16 else contextlib.nullcontext():
            model(inputs_embeds=x, attention_mask=mask)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_constants_are_what_a_decoder_layer_saves(dtype):
    """ACTIVATIONS[dtype] = (a_D, a_I): a layer saves a_D x hidden + a_I x intermediate bytes a
    token, and its own copy of the [T, T] mask. Measured as the difference between 4 and 2 layers
    (the rotary tables and final norm are shared); bf16 allows the 2 bytes x hidden that CUDA's
    attention kernels save beside."""
    hidden, intermediate, tokens = 64, 176, 96
    per_layer = (saved_bytes(4, dtype) - saved_bytes(2, dtype)) / 2
    text = transformers.Qwen2Config(hidden_size=hidden, intermediate_size=intermediate)
    text.num_hidden_layers = 1
    planned = memory.activation_bytes(text, 1, tokens, dtype, checkpointing=False)
    small = 32 * tokens  # the attention's log-sum-exp, a few bytes a token
    if dtype == torch.float32:
        assert abs(planned - per_layer) <= small, (per_layer, planned)
    else:
        assert 0 <= planned - per_layer <= small + 2 * hidden * tokens, (per_layer, planned)
    # checkpointing keeps each layer's float32 input and one layer's set
    text.num_hidden_layers = 4
    checkpointed = memory.activation_bytes(text, 1, tokens, dtype, checkpointing=True)
    assert checkpointed == 4 * tokens * hidden * 4 + planned


def plan_args(**kw):
    base = dict(
        stage="dft",
        batch_size=8,
        max_length=192,
        fsdp=False,
        grad_checkpointing=False,
        gamma=0.5,
        ignore_plan=False,
        plan_gpus=None,
        plan_gib=None,
        teacher="T",
    )
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def metas(ckpts):
    student = memory.meta_llava(ckpts / "student")
    llava_kd.apply_stage(student, "dft")
    return student, memory.meta_llava(ckpts / "teacher")


def totals(metas, a, world):
    rows = {
        fsdp: memory.memory_plan(*metas, a.batch_size, a.max_length, world, False, fsdp, 0.5)
        for fsdp in (False, True)
    }
    return {(f, c): memory.plan_total(rows[f], c) for f in (False, True) for c in (False, True)}


def refusal(metas, a, world, limit, monkeypatch):
    monkeypatch.setattr(memory, "device_bytes", lambda device: limit)
    with pytest.raises(errors.UserError) as e:
        memory.check_memory(a, world, torch.device("cpu"), *metas, master=False)
    return str(e.value)


def test_a_run_that_does_not_fit_is_stopped_naming_what_fits(toy, ckpts, metas, monkeypatch):
    a = plan_args(batch_size=8, max_length=4096)
    t = totals(metas, a, world=8)
    # the plan's own sense: checkpointing and sharding lower it
    assert t[False, True] < t[False, False] and t[True, False] < t[False, False]
    message = refusal(
        metas, plan_args(batch_size=8, max_length=4096), 8, t[False, True] * 0.99, monkeypatch
    )
    assert message.startswith("memory plan: ") and "exceeds" in message and "--fsdp" in message
    # below checkpointing's total but above sharding's with checkpointing: --fsdp named, and that it
    # shards the teacher (the toy's teacher is most of what a process holds)
    a = plan_args(batch_size=8, max_length=4096, grad_checkpointing=True)
    between = (t[True, True] + t[False, True]) / 2
    sharded = "--fsdp (train.sh: FSDP=1; it shards the teacher's layers too) fits"
    assert sharded in refusal(metas, a, 8, between, monkeypatch)
    rows = {
        f: dict((w, b) for w, b, _ in memory.memory_plan(*metas, 8, 4096, 8, False, f, 0.5))
        for f in (False, True)
    }
    teacher = [rows[f][memory.TEACHER_ROW] for f in (False, True)]
    layers = sum(p.numel() for p in metas[1].model.language_model.layers.parameters())
    assert teacher[0] - teacher[1] == pytest.approx(4 * layers * 7 / 8)  # 1/8 of its layers held
    # one process, too little for any setting of this micro-batch: a smaller one is named
    a = plan_args(batch_size=8, max_length=4096, grad_checkpointing=True)
    one = totals(metas, plan_args(batch_size=1, max_length=4096), world=1)[False, True]
    message = refusal(metas, a, 1, one * 1.01, monkeypatch)
    assert "--batch_size 1 (train.sh: BATCH=1) fits" in message, message
    assert "nothing tried fits" in refusal(metas, a, 1, one * 0.5, monkeypatch)
    a.ignore_plan = True  # the user's word against the plan's
    memory.check_memory(a, 1, torch.device("cpu"), *metas, master=False)


def test_the_plan_turns_checkpointing_on_exactly_where_the_stage_needs_it(
    metas, monkeypatch, capsys
):
    """Off where the stage fits without it, on (with a note) where it fits only with it; the flag
    forces it anywhere; where neither fits, the refusal names what would."""
    t = totals(metas, plan_args(batch_size=8, max_length=4096), world=8)
    for limit, flag, on in [
        (t[False, False] * 1.01, False, False),  # fits without
        ((t[False, True] + t[False, False]) / 2, False, True),  # fits only with it
        (t[False, False] * 1.01, True, True),  # the flag's
    ]:
        a = plan_args(batch_size=8, max_length=4096, grad_checkpointing=flag)
        monkeypatch.setattr(memory, "device_bytes", lambda device, limit=limit: limit)
        assert memory.check_memory(a, 8, torch.device("cpu"), *metas, master=True) == on
        assert a.grad_checkpointing == flag  # a decision returned, the flags as given
        turned = "note: --grad_checkpointing turned on" in capsys.readouterr().out
        assert turned == (on and not flag)
    a = plan_args(batch_size=8, max_length=4096)
    assert "exceeds" in refusal(metas, a, 8, t[False, True] * 0.99, monkeypatch)


def test_plan_prints_before_any_weight_loads(toy, ckpts, tmp_path, monkeypatch, capsys):
    def no_weights(*a, **kw):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_weights)
    extra = ["--init", str(ckpts / "student"), "--teacher", str(ckpts / "teacher"), "--plan"]
    llava_kd.main(args(toy, "dft", tmp_path / "out", *extra))
    printed = capsys.readouterr().out
    assert "memory plan, GiB a process (dft; micro-batch 8 x 2048 tokens; float32" in printed
    for row in ("teacher, frozen", "activations, checkpointing on", "total, checkpointing off"):
        assert row in printed
    assert "plan: " in printed and not (tmp_path / "out").exists()


def held_gradients(self, *args):
    """Student.forward, for the test below: at each forward after an optimizer step's first
    micro-step, the bytes of gradient this process holds (FSDP2's own record of each parameter:
    whole or sharded; there is no public accessor)."""
    from torch.distributed.fsdp import FSDPModule

    held = 0
    for m in self.modules():
        if isinstance(m, FSDPModule):
            for p in m._get_fsdp_state()._fsdp_param_group.fsdp_params:
                whole = getattr(p, "_unsharded_param", None)  # absent once resharded
                grads = [p.unsharded_accumulated_grad, p.sharded_param.grad]
                grads.append(None if whole is None else whole.grad)
                local = [
                    g.to_local() if hasattr(g, "to_local") else g for g in grads if g is not None
                ]
                held += sum(g.numel() * g.element_size() for g in local)
    if held:
        print("held", held)
    return FORWARD(self, *args)


FORWARD = llava_kd.Student.forward


def test_the_plan_counts_the_gradients_fsdp2_holds_between_micro_steps(
    toy, ckpts, tmp_path, monkeypatch
):
    """sft under --fsdp on 2 processes x 4 x 2 micro-steps: between the micro-steps each process
    holds its shard of every gradient (the loop reduce-scatters every micro-step; with gradient
    sync off it would hold them whole), as the plan's gradient row says."""
    monkeypatch.setattr(llava_kd.Student, "forward", held_gradients)  # the forks inherit it
    argv = args(toy, "sft", tmp_path, "--init", str(ckpts / "student"), "--max_steps", "1")
    argv[argv.index("--batch_size") + 1] = "4"
    outs = finish(processes(*argv, "--fsdp"))
    held = [int(out.split("held ")[-1].split()[0]) for out in outs]
    student = memory.meta_llava(ckpts / "student")
    llava_kd.apply_stage(student, "sft")
    rows = memory.memory_plan(student, None, 4, 192, 2, False, True, 0.5, 2, accum=2)
    planned = {what: b for what, b, _ in rows}["gradients, float32"]
    assert held == [planned, planned]


def test_a_cpu_peak_counts_the_pages_of_a_mapped_checkpoint_not_read_in(tmp_path):
    """What a GPU would hold whole: a mapped .safetensors file's pages count until they are read
    (then the resident memory counts them); another mapped file never counts."""
    import mmap

    size = 8 * 2**20
    for name in ("w.safetensors", "w.bin"):
        (tmp_path / name).write_bytes(b"\0" * size)
    before = memory.unread_mapped_bytes()
    with open(tmp_path / "w.bin", "rb") as other, open(tmp_path / "w.safetensors", "rb") as f:
        ignored = mmap.mmap(other.fileno(), 0, access=mmap.ACCESS_READ)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert memory.unread_mapped_bytes() - before == size
        assert sum(mapped[i] for i in range(0, size, 4096)) == 0  # every page read in
        assert memory.unread_mapped_bytes() == before
        mapped.close()
        ignored.close()
