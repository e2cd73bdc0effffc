"""Memory: the plan (bytes a process holds at its peak, from the configs alone, printed before any
weight loads), what the log reports, and the frozen weights held in bf16 on CUDA. GiB = 2**30."""

import os
import re
import resource

import torch
import transformers

import errors
import processes


def hold_frozen_in_bf16(model, cuda):
    """On CUDA, the frozen Linear and Conv2d weights that bf16 holds exactly (those of a bf16
    checkpoint: most published ones) are held in bf16. Autocast ran them in bf16 anyway, the same
    numbers, now without a cast at each use and each recompute, in half the memory. A weight tied to
    the embeddings stays (the residual stream stays float32). Checkpoints save them in float32."""
    tied = model.get_input_embeddings().weight
    for m in model.modules() if cuda else []:
        w = getattr(m, "weight", None)
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or w.requires_grad or w is tied:
            continue
        if w.dtype == torch.float32 and torch.equal(w.bfloat16().float(), w):
            w.data = w.data.bfloat16()
            w.held_in_bf16 = True


def trained_bytes(params, opt):
    """This process's bytes of trained parameters, their gradients and AdamW state (its shards under
    FSDP)."""
    grads = [p.grad for p in params if p.grad is not None]
    moments = [x for s in opt.state.values() for x in s.values()]
    tensors = [*params, *grads, *moments]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP: DTensors
    return sum(t.numel() * t.element_size() for t in local)


LAST_UNREAD = [0]  # peaks' last count of the unread mapped bytes


def peaks(device, step=0):
    """(allocated, reserved) at a step: on CUDA the peaks of memory allocated and of what the
    caching allocator held (what the device must have); on a CPU both the peak resident memory and
    the pages of the checkpoint files it maps that were never read in (a frozen teacher's embedding
    rows no token looked up): a GPU holds those weights whole, and so does the plan. Those pages are
    counted at the first ten steps and every 50th (a count reads /proc/self/smaps, ~20 ms): a run
    reads them in at its first steps."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    if step < 10 or step % 50 == 0:
        LAST_UNREAD[0] = unread_mapped_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + LAST_UNREAD[0]
    return peak, peak


def unread_mapped_bytes():
    """The bytes of this process's mapped .safetensors files not resident (/proc/self/smaps: a
    mapping's header line ends with its path; its Size and Rss lines follow)."""
    with open("/proc/self/maps") as f:  # ~30x faster to read than smaps
        if ".safetensors" not in f.read():
            return 0
    with open("/proc/self/smaps") as f:
        text = f.read()
    found = re.finditer(r"\.safetensors\nSize:\s+(\d+) kB\n(?:.*\n)*?Rss:\s+(\d+) kB", text)
    return sum(int(size) - int(rss) for size, rss in (m.groups() for m in found)) * 1024


# Saved activations a token a decoder layer (Qwen2/Llama: attention + SwiGLU MLP), measured with
# saved_tensors_hooks (tests/test_plan.py measures them): bytes = a_D x hidden + a_I x intermediate,
# and a row of the attention mask: each layer converts the padded batch's [T, T] mask to the query's
# dtype and keeps it. float32: 10 hidden-wide tensors (two RMSNorms' inputs and outputs, q, k, v,
# the projections' inputs) and 4 intermediate-wide (gate, up, act(gate), their product); bf16
# autocast: the norms stay float32, each projection's input is its own bf16 cast (34 x hidden on a
# CPU; 36 allows the attention output that CUDA's kernels save beside).
ACTIVATIONS = {torch.float32: (40, 16), torch.bfloat16: (36, 8)}
# fused_loss's block, logits (the loop's): on CUDA 883 rows of Qwen's 151936, the heads read once
# a block; [rows, V] float32 tensors alive in a block (2.7 measured, peak RSS)
LOSS_BLOCK = dict(cuda=2**27, cpu=2**24)
BLOCK_TENSORS = 3
CPU_RUNTIME = 0.42 * 2**30  # python, torch, transformers and the data (the toy: 0.41 measured)
CUDA_RUNTIME = 1.0 * 2**30  # CUDA context, NCCL buffers (an estimate; nothing on a CPU shows it)


def meta_llava(path=None, vision=None, llm=None):
    """The LLaVA that a checkpoint directory (or --vision + --llm) describes, on the meta device:
    every parameter's shape, without reading a weight."""
    if path:
        cfg = transformers.AutoConfig.from_pretrained(path)
    else:
        v = transformers.AutoConfig.from_pretrained(vision)
        v = getattr(v, "vision_config", v)  # a SigLIP/CLIP/LLaVA checkpoint: its tower's config
        t = transformers.AutoConfig.from_pretrained(llm)
        cfg = transformers.LlavaConfig(
            vision_config=v, text_config=t, tie_word_embeddings=t.tie_word_embeddings
        )
    with torch.device("meta"):
        return transformers.LlavaForConditionalGeneration(cfg)


def numel(module, trained=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trained)


def activation_bytes(text, batch, length, dtype, checkpointing, residual=4):
    """The student LLM's saved activations for a micro-batch of `batch` x `length` tokens: every
    layer's (the graph holds them until backward), or with checkpointing each layer's input (the
    residual stream: float32, bf16 under FSDP2's bf16 policy) and one layer's recomputed set."""
    a_d, a_i = ACTIVATIONS[dtype]
    tokens = batch * length
    mask = batch * length**2 * dtype.itemsize
    layer = tokens * (a_d * text.hidden_size + a_i * text.intermediate_size) + mask
    layers = text.num_hidden_layers
    if checkpointing:
        return layers * tokens * text.hidden_size * residual + layer
    return layers * layer


TEACHER_ROW = "teacher, frozen (tower: the student's; FSDP2: layers sharded)"
# (under FSDP2 its forward gathers two of its layers at a time, before the student's forward: below
# the peak at that forward's end, so no row)


def memory_plan(
    student, teacher, batch, max_length, world, cuda, fsdp, gamma, per_node=None, accum=1
):
    """Per process: [(what, bytes, when)], when = "held" (the whole run), "forward" (at the end of
    a micro-batch's forward and backward's start, with one row of each pair "..., checkpointing
    off/on") or "step" (the optimizer's). student/teacher: meta models, the student's requires_grad
    set for the stage. FSDP2 shards over the processes of a node (per_node; replicated across
    nodes); accum: micro-steps an optimizer step."""
    text = student.config.text_config
    D = text.hidden_size
    tokens = batch * max_length
    size = 2 if cuda else 4  # the teacher's bytes an element (bf16 on CUDA)
    tower = numel(student.model.vision_tower)
    rest = numel(student) - tower  # projector + LLM, float32 masters
    trained = numel(student, trained=True)
    layers = student.model.language_model.layers
    layer = numel(layers[0])
    root = rest - len(layers) * layer  # FSDP's root group: embeddings, norm, head, projector
    shards = min(world, per_node or world) if fsdp else 1
    held_grads = (world > 1 and not fsdp) or accum > 1  # through the next micro-step's forward
    rows = [
        ("student weights, float32 (vision tower whole)", 4 * rest / shards + 4 * tower, "held"),
        # DDP keeps them in its buckets; otherwise freed after each step, made again in backward
        # (FSDP2: reduce-scattered each micro-step, their shards summed across micro-steps)
        ("gradients, float32", 4 * trained / shards, "held" if held_grads else "step"),
        ("AdamW moments, float32", 8 * trained / shards, "held"),
    ]
    if teacher is not None:
        rows += teacher_rows(teacher, D, size, fsdp, shards, gamma)
    base = ("CUDA context, NCCL (estimate)", CUDA_RUNTIME) if cuda else ("Python", CPU_RUNTIME)
    rows.append((*base, "held"))
    # FSDP2: the root group whole through forward and backward, two layers gathered at a time
    gathered = size * (2 * root + 2 * layer) if fsdp else 0
    rows.append(("FSDP2's gathered parameters", gathered, "forward"))
    # DDP on CUDA: autocast's bf16 copies of the LLM's weights, saved for backward (a frozen
    # weight's too, unless checkpointing recomputes its layer)
    llm = student.model.language_model
    for checkpointing in (False, True):
        copies = 2 * numel(llm, trained=checkpointing) if cuda and not fsdp else 0
        on = ("off", "on")[checkpointing]
        rows.append(
            (f"bf16 copies of the weights (autocast), checkpointing {on}", copies, "forward")
        )
    loss = loss_bytes(student, teacher, tokens, cuda, fsdp, gamma)
    rows.append(("loss work tensors (lean path), hidden states", loss, "forward"))
    residual = 2 if cuda and fsdp else 4
    for checkpointing in (False, True):
        dtype = torch.bfloat16 if cuda else torch.float32
        act = activation_bytes(text, batch, max_length, dtype, checkpointing, residual)
        rows.append((f"activations, checkpointing {('off', 'on')[checkpointing]}", act, "forward"))
    # fused AdamW (CUDA, DDP): no temporaries; foreach (CUDA, FSDP2): one full-size list; the
    # CPU's loop: two of the largest parameter's size
    largest = max(p.numel() for p in student.parameters() if p.requires_grad)
    temporaries = 0 if cuda and not fsdp else 4 * trained / shards if cuda else 8 * largest
    rows.append(("AdamW step temporaries", temporaries, "step"))
    return rows


def teacher_rows(teacher, D, size, fsdp, shards, gamma):
    """The frozen teacher (FSDP2: its decoder layers sharded; its embeddings and head whole, as the
    tower, the student's) and both heads' W^T W, for L_rel."""
    t_hidden = teacher.config.text_config.hidden_size
    frozen = numel(teacher) - numel(teacher.model.vision_tower)
    t_layers = teacher.model.language_model.layers
    sharded = len(t_layers) * numel(t_layers[0]) if fsdp else 0
    held = size * (frozen - sharded + sharded / shards)
    gram = 4 * (t_hidden**2 + D**2) if gamma else 0
    return [(TEACHER_ROW, held, "held"), ("W^T W of both heads", gram, "held")]


def loss_bytes(student, teacher, tokens, cuda, fsdp, gamma):
    """fused_loss: dL/dW [V, D] and dL/dh in float32 and the hidden states of both models; then the
    larger of one block's [rows, V] tensors (with, on CUDA, the head's bf16 copy under DDP, and
    under FSDP2 the float32 copy of the bf16 head that W_s^T W_s is made from) and backward's
    start, which scales dL/dW and dL/dh into new tensors (FSDP2: and casts dL/dW to bf16)."""
    text = student.config.text_config
    D, V = text.hidden_size, text.vocab_size
    t_hidden = teacher.config.text_config.hidden_size if teacher is not None else 0
    size = 2 if cuda else 4  # the teacher's bytes an element (bf16 on CUDA)
    head = 4 * V * D if student.lm_head.weight.requires_grad else 0
    hidden = (2 if cuda and fsdp else 4) * tokens * D + 4 * tokens * D + size * tokens * t_hidden
    block = BLOCK_TENSORS * 4 * min(LOSS_BLOCK["cuda" if cuda else "cpu"], tokens * V)
    if cuda:
        block += 0 if fsdp else 2 * V * D
        block += 4 * V * D if fsdp and teacher is not None and gamma else 0
    backward = head + 4 * tokens * D + (2 * V * D if cuda and fsdp and head else 0)
    return head + hidden + max(block, backward)


def plan_total(rows, checkpointing, cuda=False):
    """What is held, and the larger of the end of a forward and the optimizer step; on CUDA 10% more
    for the caching allocator's fragmentation (an estimate: no CPU shows it)."""
    skip = f"checkpointing {('on', 'off')[checkpointing]}"
    kept = [(b, when) for what, b, when in rows if not what.endswith(skip)]
    held, forward, step = (
        sum(b for b, w in kept if w == when) for when in ("held", "forward", "step")
    )
    return (held + max(forward, step)) * (1.1 if cuda else 1.0)


def device_bytes(device):
    """A GPU's memory, or on a CPU this process's share of the machine's (processes share it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / processes.per_node()


def check_memory(a, world, device, student, teacher, master, global_batch=None):
    """Prints the plan (rank 0) and stops, naming what would fit, when this run's does not.
    Returns whether the run checkpoints activations: --grad_checkpointing, or where it needs to."""
    cuda = device.type == "cuda" or bool(a.plan_gpus)  # --plan_gpus: what its GPUs would hold
    limit = a.plan_gib * 2**30 if a.plan_gpus else device_bytes(device)
    per_node = a.plan_gpus or processes.per_node(world)

    def total(batch, fsdp, checkpointing):
        accum = (global_batch or batch * world) // (batch * world)
        plan = (a.max_length, world, cuda, fsdp, a.gamma, per_node, accum)
        rows = memory_plan(student, teacher, batch, *plan)
        return rows, plan_total(rows, checkpointing, cuda)

    checkpointing = a.grad_checkpointing
    _, need = total(a.batch_size, a.fsdp, checkpointing)
    _, checkpointed = total(a.batch_size, a.fsdp, True)
    if need > limit >= checkpointed:  # on where the stage needs it (the flag forces it anywhere)
        checkpointing = True
        if master:
            print(
                f"note: --grad_checkpointing turned on: the plan is {need / 2**30:.1f} GiB without"
            )
        need = checkpointed
    mode = f"FSDP2 x {world}" if a.fsdp else "DDP" if world > 1 else "one process"
    ckpt = "on" if checkpointing else "off"
    if master:
        where = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else "CPU, "
        where = "--plan_gib's " if a.plan_gpus else where
        kinds = (False, True) if world > 1 else (False,)  # DDP, and FSDP2 on several processes
        columns = [total(a.batch_size, fsdp, False)[0] for fsdp in kinds]
        print_plan(a, world, cuda, columns)
        print(
            f"plan: {need / 2**30:.2f} GiB a process ({mode}, checkpointing {ckpt}) of "
            f"{limit / 2**30:.1f} GiB ({where}device memory)"
        )
    if need <= limit or a.ignore_plan:
        return checkpointing
    raise errors.UserError(
        f"memory plan: {need / 2**30:.1f} GiB a process ({mode}, checkpointing {ckpt}, "
        f"--batch_size {a.batch_size}, --max_length {a.max_length}) exceeds the "
        f"{limit / 2**30:.1f} GiB of the device; {what_fits(a, world, limit, total, checkpointing)}"
        f" (--ignore_plan runs it anyway)"
    )


def print_plan(a, world, cuda, columns):
    """The plan's table: a row for each part, a column for DDP (and FSDP2 on several processes)."""
    print(
        f"memory plan, GiB a process ({a.stage}; micro-batch {a.batch_size} x {a.max_length} "
        f"tokens; {'bf16 autocast' if cuda else 'float32'}; {world} process(es)):"
    )
    heads = ["DDP", f"FSDP2 x {world}"] if world > 1 else ["one process"]
    print(f"  {'':68s}" + "".join(f"{h:>13s}" for h in heads))
    when = {"held": "held", "forward": "forward", "step": "opt step"}
    lines = [(f"{name} [{when[w]}]", name) for name, _, w in columns[0]]
    lines += [(f"total, checkpointing {c}", c) for c in ("off", "on")]
    for label, name in lines:
        cells = []
        for rows in columns:
            found = {what: b for what, b, _ in rows}
            found["off"] = plan_total(rows, False, cuda)
            found["on"] = plan_total(rows, True, cuda)
            cells.append(f"{found[name] / 2**30:13.2f}")
        print(f"  {label:68s}" + "".join(cells))
    print(
        "  (total: what is held + the larger of the end of a forward and the optimizer step"
        f"{'; + 10% for fragmentation' if cuda else ''})"
    )


def what_fits(a, world, limit, total, checkpointing):
    """The change that fits, in the order that costs least: checkpointing, sharding, a smaller
    micro-batch. total(batch, fsdp, checkpointing): (the plan's rows, its bytes)."""
    options = [(a.batch_size, a.fsdp, True)]
    if world > 1:
        options += [(a.batch_size, True, checkpointing), (a.batch_size, True, True)]
    batch = a.batch_size // 2
    while batch >= 1:
        options.append((batch, a.fsdp or world > 1, True))
        batch //= 2
    for batch, fsdp, recompute in options:
        _, fits = total(batch, fsdp, recompute)
        if fits <= limit:
            changes = []
            if recompute and not checkpointing:
                changes.append("--grad_checkpointing")
            if fsdp and not a.fsdp:
                also = "; it shards the teacher's layers too" if a.teacher else ""
                changes.append(f"--fsdp (train.sh: FSDP=1{also})")
            if batch != a.batch_size:
                changes.append(f"--batch_size {batch} (train.sh: BATCH={batch})")
            return f"{' and '.join(changes)} fits ({fits / 2**30:.1f} GiB)"
    return "nothing tried fits: more GPUs with --fsdp, or a shorter --max_length"
