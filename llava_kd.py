"""LLaVA-KD (ICCV 2025, arXiv 2410.16236), minimal and exact.

    python llava_kd.py toy --out runs/toy/setup                          # tiny checkpoints + data, offline
    python llava_kd.py train --stage dpt --data JSON --images DIR --vision DIR --llm DIR --teacher DIR --out DIR
    torchrun --standalone --nproc_per_node=8 llava_kd.py train --stage dft ... --init DIR --teacher DIR
    python llava_kd.py eval --model DIR --data JSON --images DIR
    bash train.sh                                                        # the whole recipe (README)

Sections, top to bottom: the losses (paper Sec. 3: MDist = L_res + L_vis, RDist = L_rel, and their sum
L_DPT / L_DFT), the model wrapper and the stage table (Table A9), the toy setup, the training loop.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
import transformers
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import data

# ------------------------------------------------------------------------------------------------
# Losses. Plain tensors in, a scalar out: copy this section into another project as it is.
# logits are [B, T, V]; labels [B, T] with -100 on every position that is not an answer;
# visual_mask [B, T] bool, True at the image-token positions (input_ids == image_token_id).

CHUNK = 2 ** 22  # elements of a float32 [rows, V] block worked on at once: bounds the losses' peak memory


def _math_dtype(*xs):  # softmax and matrix math in float32 at least (bf16 in -> fp32; fp64 stays fp64)
    return torch.promote_types(torch.promote_types(xs[0].dtype, xs[1].dtype), torch.float32)


class _RowKL(torch.autograd.Function):
    """sum_{rows r} KL(p_t,r || p_s,r), softmax over the shared leading V = min(V_s, V_t) entries.

    Works on blocks of rows and keeps only each row's log-normaliser for backward, which uses the
    closed form  d KL(p_t || p_s) / d s = p_s - p_t : no [rows, V] tensor outlives its block.
    """

    @staticmethod
    def forward(ctx, s, t, rows):
        v, dt = min(s.shape[-1], t.shape[-1]), _math_dtype(s, t)
        s2, t2 = s.reshape(-1, s.shape[-1])[:, :v], t.reshape(-1, t.shape[-1])[:, :v]
        total, log_z = torch.zeros((), dtype=dt, device=s.device), []
        for idx in rows.split(max(1, CHUNK // v)):
            log_ps, log_pt = s2[idx].to(dt), t2[idx].to(dt)
            z = torch.stack([log_ps.logsumexp(-1), log_pt.logsumexp(-1)], 1)  # [rows, 2]
            log_ps -= z[:, :1]
            log_pt -= z[:, 1:]
            total += (log_pt.exp() * (log_pt - log_ps)).sum()  # sum_j p_t,j (log p_t,j - log p_s,j)
            log_z.append(z)
        ctx.save_for_backward(s, t, rows, torch.cat(log_z) if log_z else s.new_zeros(0, 2, dtype=dt))
        return total

    @staticmethod
    def backward(ctx, g):
        s, t, rows, log_z = ctx.saved_tensors
        v, dt = min(s.shape[-1], t.shape[-1]), _math_dtype(s, t)
        grad = torch.zeros_like(s)
        s2, t2, g2 = (x.reshape(-1, x.shape[-1])[:, :v] for x in (s, t, grad))
        n = max(1, CHUNK // v)
        for idx, z in zip(rows.split(n), log_z.split(n)):
            p_s = (s2[idx].to(dt) - z[:, :1]).exp_()
            p_t = (t2[idx].to(dt) - z[:, 1:]).exp_()
            g2[idx] = ((p_s - p_t) * g).to(grad.dtype)
        return grad, None, None


def _mean_row_kl(student_logits, teacher_logits, row_mask, num_rows=None):
    """(1 / N) sum over the rows where row_mask is True of KL(p_t || p_s); N = their number, or num_rows
    when given (the count over a whole accumulated/distributed batch). A finite 0 when there are none."""
    rows = row_mask.reshape(-1).nonzero().squeeze(1)
    return _RowKL.apply(student_logits, teacher_logits.detach(), rows) / max(num_rows or rows.numel(), 1)


# L_res = (1/M) sum_{m=1}^{M} KLD( phi_l(y_m | y_<m), phi_s(y_m | y_<m) )
#   phi_l, phi_s: the teacher's and the student's next-token distributions; m runs over the M response
#   tokens of the batch. The distribution for token m is read at position m-1: logits[:, :-1] predict
#   labels[:, 1:]. Summed over the batch, divided once by M (paper: a sum; the mean keeps alpha scale-free).
def response_loss(student_logits, teacher_logits, labels, num_rows=None):
    return _mean_row_kl(student_logits, teacher_logits, response_rows(labels), num_rows)


def response_rows(labels):  # [B, T] bool: the rows of logits that predict a labelled token
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = labels[:, 1:] != -100
    return rows


# L_vis = (1/K) sum_{k=1}^{K} sum_{j=1}^{V} phi_l(Y_j | y_<k) log( phi_l(Y_j | y_<k) / phi_s(Y_j | y_<k) )
#   k runs over the K visual tokens of the batch (visual_mask), j over the V vocabulary entries.
def visual_loss(student_logits, teacher_logits, visual_mask, num_rows=None):
    return _mean_row_kl(student_logits, teacher_logits, visual_mask, num_rows)


def _gram(x, b, pos, dt):
    """R = Y Y^T for each sample's Y = x[b_i, pos_i] ([n, K, D] -> [n, K, K]), accumulated over blocks of
    columns, so that Y itself is never built."""
    n, K = pos.shape
    R = x.new_zeros(n, K, K, dtype=dt)
    w = max(1, CHUNK // (n * K))
    for c in range(0, x.shape[-1], w):
        y = x[b[:, None], pos, c:c + w].to(dt)
        R.baddbmm_(y, y.transpose(1, 2))
    return R


def _visual_groups(visual_mask):
    """Samples with visual tokens, grouped by their number K: (sample ids [n], positions [n, K]) per group."""
    by_k = {}
    for b, k in enumerate(visual_mask.sum(1).tolist()):
        if k:  # a text-only sample has no visual tokens and no relation
            by_k.setdefault(k, []).append(b)
    for k, bs in by_k.items():
        b = torch.tensor(bs, device=visual_mask.device)
        yield b, visual_mask[b].nonzero()[:, 1].view(len(bs), k)


class _Relation(torch.autograd.Function):
    """sum over samples with visual tokens of 1 - cos(vec R_s, vec R_t), R = Y Y^T of their visual rows.

    backward: with G = d(1 - cos)/dR_s,  dL/dY_s = (G + G^T) Y_s, again block by block over the columns.
    """

    @staticmethod
    def forward(ctx, s, t, visual_mask):
        dt = _math_dtype(s, t)
        total, ctx.groups = torch.zeros((), dtype=dt, device=s.device), []
        for b, pos in _visual_groups(visual_mask):
            R_s, R_t = _gram(s, b, pos, dt), _gram(t, b, pos, dt)
            # the K*K-term sums in float64: 1 - cos is small, and fp32 sums lose its leading digits
            ss, tt, st = (torch.sum(x * y, (1, 2), dtype=torch.float64) for x, y in ((R_s, R_s), (R_t, R_t), (R_s, R_t)))
            norm = (ss * tt).sqrt().clamp_min(1e-16)  # |R_s| |R_t|, clamped as F.cosine_similarity does
            cos = st / norm
            total += (1 - cos).sum().to(dt)
            norm, cos, ss = norm[:, None, None], cos[:, None, None], ss[:, None, None]
            G = -(R_t / norm - cos * R_s / ss.clamp_min(1e-16)).to(dt)  # d(1 - cos) / dR_s, per sample
            ctx.groups.append((b, pos, G + G.transpose(1, 2)))
        ctx.save_for_backward(s)
        return total

    @staticmethod
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        grad = torch.zeros_like(s)
        for b, pos, G2 in ctx.groups:
            w = max(1, CHUNK // pos.numel())
            for c in range(0, s.shape[-1], w):
                y = s[b[:, None], pos, c:c + w].to(G2.dtype)
                grad[b[:, None], pos, c:c + w] = (torch.bmm(G2, y) * g).to(grad.dtype)
        return grad, None, None


# L_rel = 1 - Cos(R_v^s, R_v^t) = 1 - (R_v^s . R_v^t) / (||R_v^s|| ||R_v^t||),   R_v = y_v (x) y_v = Y Y^T
#   Y: one sample's K visual rows of the features (logits or hidden states; each side keeps its own width,
#   R is K x K either way). Averaged over the samples of the batch that have visual tokens.
def relation_loss(student_feats, teacher_feats, visual_mask, num_samples=None):
    n = num_samples or int(visual_mask.any(1).sum())
    return _Relation.apply(student_feats, teacher_feats.detach(), visual_mask) / max(n, 1)


# L_reg = -(1/M) sum_{m=1}^{M} log phi_s(y_m | y_<m): the student's own next-token loss on the M response
#   tokens (the usual LLaVA loss; the only loss of pt and sft). Only the M selected rows are upcast.
def next_token_loss(student_logits, labels, num_rows=None):
    rows = response_rows(labels)
    logits = student_logits[rows].float()
    nll = torch.nn.functional.cross_entropy(logits, labels[:, 1:][rows[:, :-1]], reduction="sum")
    return nll / max(num_rows or len(logits), 1)


# L_DPT = L_DFT = L_reg + alpha L_res + beta L_vis + gamma L_rel   (paper: alpha, beta, gamma = 1, 1, 0.5)
# This returns the distillation part, alpha L_res + beta L_vis + gamma L_rel, and each term for logging;
# L_reg, the student's own next-token loss, is added by the training loop. A zero weight skips its term.
# counts: optional (response rows, visual rows, samples with an image) of the whole step's batch, by which
# the sums are divided instead of this batch's own counts (gradient accumulation, DDP).
def distill_loss(student_logits, teacher_logits, labels, visual_mask, alpha=1.0, beta=1.0, gamma=0.5,
                 counts=(None, None, None)):
    zero = student_logits.new_zeros((), dtype=torch.float32)
    L_res = response_loss(student_logits, teacher_logits, labels, counts[0]) if alpha else zero
    L_vis = visual_loss(student_logits, teacher_logits, visual_mask, counts[1]) if beta else zero
    L_rel = zero
    if gamma:
        v = min(student_logits.shape[-1], teacher_logits.shape[-1])  # L_rel on the shared vocabulary
        s = student_logits if student_logits.shape[-1] == v else student_logits[..., :v]
        L_rel = relation_loss(s, teacher_logits[..., :v], visual_mask, counts[2])
    loss = alpha * L_res + beta * L_vis + gamma * L_rel
    return loss, {"L_res": L_res.detach(), "L_vis": L_vis.detach(), "L_rel": L_rel.detach()}


# ------------------------------------------------------------------------------------------------
# Models: transformers' LlavaForConditionalGeneration = vision tower -> 2-layer GELU MLP projector -> LLM.
# Every checkpoint written here loads with stock from_pretrained; any HF LLaVA checkpoint can be a teacher.

# Paper Sec. 3 and Table A9. The vision tower never trains; freezing is applied from this table only.
STAGES = {
    "pt":  dict(teacher=False, trains=("projector",), lr=1e-3, global_batch=256, chat=False),
    "dpt": dict(teacher=True, trains=("projector",), lr=1e-3, global_batch=256, chat=False),
    "sft": dict(teacher=False, trains=("projector", "llm"), lr=2e-5, global_batch=128, chat=True),
    "dft": dict(teacher=True, trains=("projector", "llm"), lr=2e-5, global_batch=128, chat=True),
}
PARTS = {"vision": ("model.vision_tower.",), "projector": ("model.multi_modal_projector.",),
         "llm": ("model.language_model.", "lm_head.")}


def apply_stage(model, stage):
    """requires_grad on exactly the parts that STAGES[stage] trains; everything else frozen."""
    prefixes = tuple(p for part in STAGES[stage]["trains"] for p in PARTS[part])
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))


def _checked(loaded, path):
    """from_pretrained(..., output_loading_info=True) -> the model, or an error naming what did not load."""
    model, info = loaded
    bad = {k: info.get(k) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise RuntimeError(f"{path}: weights did not load as expected: {bad}")
    return model


def load_vision(path):
    """A SigLIP (or CLIP) checkpoint directory, or the vision tower of a LLaVA one -> (tower, image processor,
    vision_feature_layer, vision_feature_select_strategy, extra tokens such as CLS)."""
    cfg = transformers.AutoConfig.from_pretrained(path)
    if cfg.model_type == "llava":
        llava = _checked(transformers.LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True), path)
        proc = transformers.AutoProcessor.from_pretrained(path)
        return (llava.model.vision_tower, proc.image_processor, cfg.vision_feature_layer,
                cfg.vision_feature_select_strategy, proc.num_additional_image_tokens)
    cls = {"siglip": transformers.SiglipVisionModel, "siglip_vision_model": transformers.SiglipVisionModel,
           "clip": transformers.CLIPVisionModel, "clip_vision_model": transformers.CLIPVisionModel}.get(cfg.model_type)
    if cls is None:
        raise ValueError(f"--vision {path}: a SigLIP, CLIP or LLaVA checkpoint is needed, not {cfg.model_type}")
    tower = _checked(cls.from_pretrained(path, output_loading_info=True), path)
    clip = cls is transformers.CLIPVisionModel  # CLIP has a CLS token, which LLaVA-1.5 drops ("default")
    # SigLIP has no CLS: "full" keeps all 27 x 27 = 729 patch tokens at 384px (the public code drops one)
    return tower, transformers.AutoImageProcessor.from_pretrained(path), -2, ("default" if clip else "full"), int(clip)


def make_processor(image_processor, tokenizer, config, extra_tokens):
    return transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, image_token="<image>",
        num_additional_image_tokens=extra_tokens, chat_template=tokenizer.chat_template)


def build_student(vision_path, llm_path):
    """A new LLaVA from a pretrained vision tower and a pretrained causal LM, with a new projector."""
    tower, image_processor, layer, strategy, extra = load_vision(vision_path)
    llm = _checked(transformers.AutoModelForCausalLM.from_pretrained(llm_path, output_loading_info=True), llm_path)
    tok = transformers.AutoTokenizer.from_pretrained(llm_path)
    if "<image>" not in tok.get_vocab():
        tok.add_tokens(["<image>"], special_tokens=True)
    if len(tok) > llm.config.vocab_size:
        llm.resize_token_embeddings(len(tok))
    config = transformers.LlavaConfig(
        vision_config=tower.config, text_config=llm.config, image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=layer, vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
        tie_word_embeddings=llm.config.tie_word_embeddings)
    with torch.device("meta"):  # a shell: the pretrained parts are put in below, the projector is new
        model = transformers.LlavaForConditionalGeneration(config)
    model.model.vision_tower, model.model.language_model, model.lm_head = tower, llm.model, llm.lm_head
    model.model.multi_modal_projector = transformers.models.llava.modeling_llava.LlavaMultiModalProjector(config)
    model.generation_config = llm.generation_config
    processor = make_processor(image_processor, tok, config, extra)
    config.image_seq_length = data.image_seq_length(processor)
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if meta:
        raise RuntimeError(f"student built from {vision_path} + {llm_path}: these were not loaded: {meta[:5]}")
    return model, processor


def load_llava(path, dtype=None):
    """Any LLaVA checkpoint directory in HF format (a teacher, or a previous stage's output)."""
    model = _checked(transformers.LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype, output_loading_info=True), path)
    return model, transformers.AutoProcessor.from_pretrained(path)


def check_compatible(teacher, t_proc, student, s_proc):
    """Distillation compares the two models token by token: same token ids, same image token, same
    number of visual tokens per image. Stops with a clear message otherwise."""
    vs, vt = s_proc.tokenizer.get_vocab(), t_proc.tokenizer.get_vocab()
    small, big = sorted((vs, vt), key=len)
    differ = [k for k, i in small.items() if big.get(k) != i]
    problems = []
    if differ:
        problems.append(f"the tokenizers disagree on {len(differ)} tokens (e.g. {differ[:3]}): use a student LLM "
                        f"of the teacher's family, with the same tokenizer")
    if teacher.config.image_token_id != student.config.image_token_id:
        problems.append(f"image token ids differ: teacher {teacher.config.image_token_id}, "
                        f"student {student.config.image_token_id}")
    nt, ns = data.image_seq_length(t_proc), data.image_seq_length(s_proc)
    if nt != ns:
        problems.append(f"visual tokens per image differ: teacher {nt}, student {ns} (use the teacher's vision "
                        f"tower for the student: --vision TEACHER_DIR)")
    if problems:
        raise ValueError("teacher and student cannot be distilled:\n  " + "\n  ".join(problems))


def load_teacher(path, student, s_proc, dtype=None):
    """The teacher: frozen, in eval mode, never updated; checked against the student, whose vision tower
    becomes the teacher's (one copy in memory: the paper shares the visual encoder)."""
    teacher, t_proc = load_llava(path, dtype)
    teacher.eval().requires_grad_(False)
    check_compatible(teacher, t_proc, student, s_proc)
    student.model.vision_tower = teacher.model.vision_tower
    return teacher


def vision_features(model, pixel_values):
    """Z_v: the frozen vision tower's selected hidden states, before the projector. Teacher and student
    share the tower, so this is computed once per batch and handed to both projectors."""
    c = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[c.vision_feature_layer]
    return hidden[:, 1:] if c.vision_feature_select_strategy == "default" else hidden


def llava_logits(model, input_ids, attention_mask, z_v):
    """LLaVA's forward from Z_v: H_v = projector(Z_v) is written on the image-token positions of the
    text embeddings, then the LLM runs. Returns the logits [B, T, V]."""
    embeds = model.get_input_embeddings()(input_ids)
    if z_v is not None:
        mask = input_ids == model.config.image_token_id
        h_v = model.model.multi_modal_projector(z_v)
        if int(mask.sum()) != h_v.shape[0] * h_v.shape[1]:
            raise ValueError(f"{int(mask.sum())} image tokens in the batch for {h_v.shape[0]} x {h_v.shape[1]} "
                             f"visual features")
        embeds = embeds.masked_scatter(mask[..., None], h_v.to(embeds.dtype))
    return model(inputs_embeds=embeds, attention_mask=attention_mask).logits


def save_checkpoint_files(model, processor, out):
    model.save_pretrained(out)  # safetensors
    processor.save_pretrained(out)


# ------------------------------------------------------------------------------------------------
# Toy setup: tiny real checkpoints and data, written offline, so every code path runs on a laptop CPU.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def toy_tokenizer(texts):
    """A byte-level BPE tokenizer trained on the toy texts, with Qwen's special tokens and <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>", chat_template=CHATML)


TOY_LLMS = {  # teacher clearly larger than student; vocabulary sizes padded differently, as in real pairs
    "teacher_llm": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, pad=64),
    "student_llm": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, pad=16),
}


def make_toy(out, seed=0, **data_sizes):
    texts = data.make_toy_data(os.path.join(out, "data"), seed, **data_sizes)
    tok = toy_tokenizer(texts)
    torch.manual_seed(seed)
    vcfg = transformers.SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4)
    transformers.SiglipVisionModel(vcfg).save_pretrained(os.path.join(out, "vision"))
    transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(os.path.join(out, "vision"))
    for name, c in TOY_LLMS.items():
        c = dict(c)
        pad = c.pop("pad")
        cfg = transformers.Qwen2Config(vocab_size=-(-len(tok) // pad) * pad, num_key_value_heads=c["num_attention_heads"],
                                       max_position_embeddings=512, tie_word_embeddings=name == "student_llm",
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **c)
        llm = transformers.Qwen2ForCausalLM(cfg)
        llm.generation_config = transformers.GenerationConfig(
            eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")], pad_token_id=tok.eos_token_id)
        llm.save_pretrained(os.path.join(out, name))
        tok.save_pretrained(os.path.join(out, name))
    print(f"toy setup in {out}: vision/ teacher_llm/ student_llm/ data/{{pretrain,sft,test}}.json data/images/")


# ------------------------------------------------------------------------------------------------
# Training: one plain loop for all four stages (nanoGPT-style), single process or torchrun + DDP.
class _Student(torch.nn.Module):
    """What DDP wraps: the student from Z_v (computed once, shared with the teacher) to logits."""

    def __init__(self, llava):
        super().__init__()
        self.llava = llava

    def forward(self, input_ids, attention_mask, z_v):
        return llava_logits(self.llava, input_ids, attention_mask, z_v)


def stage_loss(student, model, teacher, b, weights=(1.0, 1.0, 0.5), counts=(None, None, None)):
    """One micro-batch's loss: L_reg in pt/sft; L_DPT = L_DFT = L_reg + alpha L_res + beta L_vis + gamma L_rel
    with a teacher (dpt/dft). student runs the student (_Student, or DDP around it); model is its LLaVA."""
    with torch.no_grad():  # the frozen, shared vision tower: Z_v once for both models
        z_v = vision_features(model, b["pixel_values"]) if b["pixel_values"] is not None else None
    logits = student(b["input_ids"], b["attention_mask"], z_v)
    L_reg = next_token_loss(logits, b["labels"], counts[0])
    if teacher is None:
        return L_reg, {"L_reg": L_reg.detach()}
    with torch.no_grad():
        t_logits = llava_logits(teacher, b["input_ids"], b["attention_mask"], z_v)
    visual_mask = b["input_ids"] == model.config.image_token_id
    L_kd, terms = distill_loss(logits, t_logits, b["labels"], visual_mask, *weights, counts=counts)
    return L_reg + L_kd, {"L_reg": L_reg.detach(), **terms}


def lr_at(step, total, peak, warmup_ratio=0.03):
    """Linear warmup over the first 3% of the steps, then cosine decay to 0 (Table A9)."""
    warmup = max(1, math.ceil(total * warmup_ratio))
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save_checkpoint(model, processor, state, out):
    """out/checkpoint/: model + processor (stock from_pretrained loads it) + train_state.pt for --resume.
    Written beside it and renamed into place, so a crash while saving leaves the previous one whole."""
    final, tmp, old = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint_files(model, processor, tmp)
    torch.save(state, os.path.join(tmp, "train_state.pt"))
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def train(a):
    stage = STAGES[a.stage]
    # DDP, as nanoGPT: torchrun sets RANK; one process per device; gloo on CPU, NCCL on CUDA
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available() and not a.cpu
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    master = rank == 0
    lr = a.lr or stage["lr"]
    global_batch = a.global_batch_size or stage["global_batch"]
    if global_batch % (a.batch_size * world):
        raise SystemExit(f"--global_batch_size {global_batch} must be a multiple of --batch_size {a.batch_size} "
                         f"x {world} processes")
    accum = global_batch // (a.batch_size * world)  # micro-steps per optimizer step on each process
    if stage["teacher"] != bool(a.teacher):
        raise SystemExit(f"--stage {a.stage} " + ("needs --teacher DIR" if stage["teacher"] else "takes no --teacher"))
    ckpt = os.path.join(a.out, "checkpoint")
    if a.resume and not os.path.isfile(os.path.join(ckpt, "train_state.pt")):
        raise SystemExit(f"--resume: no checkpoint in {ckpt} to continue from")
    if not (a.resume or a.init or (a.vision and a.llm)):
        raise SystemExit("give --init DIR (a previous stage's output) or --vision DIR --llm DIR (a new student)")

    torch.manual_seed(a.seed)  # the same new projector on every process
    model, processor = load_llava(ckpt if a.resume else a.init) if (a.resume or a.init) else build_student(a.vision, a.llm)
    teacher = None
    if stage["teacher"]:
        teacher = load_teacher(a.teacher, model, processor, torch.bfloat16 if cuda else None).to(device)
        model.model.vision_tower.float()  # the shared tower stays in the student's dtype, as it is saved with it
    apply_stage(model, a.stage)
    model.to(device)
    model.config.use_cache = False
    if a.grad_checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # text-only micro-batches leave the projector unused: DDP must then look for unused parameters
    student = DDP(_Student(model), device_ids=[device.index] if cuda else None,
                  find_unused_parameters=stage["chat"]) if ddp else _Student(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    ds = data.LlavaDataset(a.data, a.images, processor, chat=stage["chat"], max_length=a.max_length)
    steps_per_epoch = len(ds) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{a.data}: {len(ds)} samples are fewer than one global batch ({global_batch})")
    total = steps_per_epoch * a.epochs
    end = min(total, a.max_steps or total)  # --max_steps stops early; the schedule stays that of `total`
    step = 0
    if a.resume:
        state = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=False)
        if (state["total"], state["global_batch"], state["seed"]) != (total, global_batch, a.seed):
            raise SystemExit(f"--resume: {ckpt} was written with another data size, --global_batch_size or --seed")
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    image_id, pad_id = model.config.image_token_id, processor.tokenizer.pad_token_id
    coll = functools.partial(data.collate, pad_token_id=pad_id)

    def micro_batches(step):
        """This process's micro-batches from optimizer step `step` on; the order depends only on the seed and
        the epoch (DistributedSampler), so a resumed run sees what an uninterrupted one would have."""
        while True:
            epoch, skip = divmod(step, steps_per_epoch)
            sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=a.seed, drop_last=True)
            sampler.set_epoch(epoch)
            order = list(sampler)[skip * accum * a.batch_size:][:(steps_per_epoch - skip) * accum * a.batch_size]
            yield from torch.utils.data.DataLoader(ds, a.batch_size, sampler=order, collate_fn=coll,
                                                   num_workers=a.workers)
            step = (epoch + 1) * steps_per_epoch

    log = None
    if master:
        os.makedirs(a.out, exist_ok=True)
        log = open(os.path.join(a.out, "log.jsonl"), "a" if a.resume else "w")
        n_train = sum(p.numel() for p in params)
        print(f"stage {a.stage}: {len(ds)} samples, {total} steps of {global_batch} ({world} x {a.batch_size} x "
              f"{accum}), lr {lr}, {n_train / 1e6:.2f}M trainable, teacher {a.teacher or '-'}")
    batches = micro_batches(step)
    bar = tqdm(range(step, end), initial=step, total=end, disable=not master, desc=a.stage)
    for step in bar:
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr)
        micro = [next(batches) for _ in range(accum)]
        # each loss is a mean over the whole global batch: sums divided by the step's counts over every
        # micro-batch and process (not by each micro-batch's own), so N processes compute what 1 would
        count = torch.tensor([[int(response_rows(b["labels"]).sum()), int((b["input_ids"] == image_id).sum()),
                               int((b["input_ids"] == image_id).any(1).sum()), int(b["attention_mask"].sum())]
                              for b in micro], dtype=torch.float64).sum(0).to(device)
        if ddp:
            dist.all_reduce(count)
        n_res, n_vis, n_img = (max(float(c), 1.0) / world for c in count[:3])  # DDP averages over processes
        logged = torch.zeros(5, dtype=torch.float64, device=device)  # loss, L_reg, L_res, L_vis, L_rel
        for i, b in enumerate(micro):
            b = {k: v.to(device) if v is not None else None for k, v in b.items()}
            # only the last micro-step all-reduces the gradients; the others accumulate locally
            sync = contextlib.nullcontext() if (not ddp or i == accum - 1) else student.no_sync()
            with sync, autocast:
                loss, terms = stage_loss(student, model, teacher, b, (a.alpha, a.beta, a.gamma), (n_res, n_vis, n_img))
            loss.backward()
            logged += torch.stack([loss.detach()] + [terms.get(k, torch.zeros(())).to(device)
                                                     for k in ("L_reg", "L_res", "L_vis", "L_rel")]).double()
        if ddp:
            dist.all_reduce(logged)
        logged /= world
        if not torch.isfinite(logged).all():  # every process sees the same numbers and stops together
            raise SystemExit(f"stage {a.stage}: loss is {logged[0].item()} at step {step + 1}; stopped without "
                             f"saving, the last good checkpoint is in {ckpt}")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        save = step + 1 == end or (a.save_every and (step + 1) % a.save_every == 0)
        if master:
            rec = dict(zip(("loss", "L_reg", "L_res", "L_vis", "L_rel"), logged.tolist()))
            rec.update(step=step + 1, lr=opt.param_groups[0]["lr"], tokens_per_s=count[3].item() / (time.time() - t0))
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k not in ("step", "lr")})
            if save:
                state = dict(step=step + 1, total=total, global_batch=global_batch, seed=a.seed,
                             optimizer=opt.state_dict(), args=vars(a))
                save_checkpoint(model, processor, state, a.out)
        if ddp and save:
            dist.barrier()  # nobody runs ahead of a checkpoint being written
    if master:
        for name in os.listdir(ckpt):  # the stage's output: the model, loadable from --out itself
            if name != "train_state.pt":
                shutil.copy(os.path.join(ckpt, name), os.path.join(a.out, name))
        print(f"stage {a.stage}: done at step {end}; model in {a.out}")
    if ddp:
        dist.destroy_process_group()


@torch.no_grad()
def evaluate(model_dir, data_json, images, batch_size=32, max_new_tokens=10):
    """Exact-match accuracy of greedy answers to the first question of each sample (the toy test set)."""
    model, processor = load_llava(model_dir)
    model.eval()
    ds = data.LlavaDataset(data_json, images, processor, chat=True, max_length=4096)
    tok, correct = processor.tokenizer, 0
    for i in range(0, len(ds), batch_size):
        rows = [ds.rows[j] for j in range(i, min(i + batch_size, len(ds)))]
        prompts = [[{"role": "user", "content": conv[0]["value"]}] for _, _, conv in rows]
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        images_ = [Image.open(path).convert("RGB") for _, path, _ in rows if path]
        tok.padding_side = "left"  # generation continues every row from its last token
        inputs = processor(text=texts, images=images_ or None, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(ans.strip().lower() == conv[1]["value"].strip().lower() for ans, (_, _, conv) in zip(answers, rows))
    return correct / len(ds)


def table(results, out, seconds=None):
    """One row per training scheme: mean and standard deviation of the accuracy over seeds."""
    rows = {}
    for line in open(results):
        r = json.loads(line)
        rows.setdefault(r["row"], []).append(100 * r["accuracy"])
    lines = ["| model (held-out toy test set) | exact match % | seeds |", "| --- | --- | --- |"]
    for name, xs in rows.items():
        sd = (sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5
        lines.append(f"| {name} | {sum(xs) / len(xs):.1f} ± {sd:.1f} | {len(xs)} |")
    text = "\n".join(lines) + (f"\n\nwall time {seconds // 60} min {seconds % 60} s" if seconds is not None else "")
    with open(out, "w") as f:
        f.write(text + "\n")
    return text


def main(argv=None):
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("toy", help="write tiny checkpoints and a toy data set, offline")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("train", help="one stage: pt, dpt, sft or dft")
    p.add_argument("--stage", required=True, choices=list(STAGES))
    p.add_argument("--data", required=True, help="LLaVA JSON")
    p.add_argument("--images", required=True, help="folder the JSON's image paths are relative to")
    p.add_argument("--out", required=True)
    p.add_argument("--init", help="continue from this LLaVA checkpoint (the previous stage's --out)")
    p.add_argument("--vision", help="a new student: SigLIP/CLIP checkpoint, or a LLaVA one's vision tower")
    p.add_argument("--llm", help="a new student: Qwen2-style causal LM checkpoint")
    p.add_argument("--teacher", help="LLaVA checkpoint of the teacher (dpt, dft)")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of L_res (0: off)")
    p.add_argument("--beta", type=float, default=1.0, help="weight of L_vis (0: off)")
    p.add_argument("--gamma", type=float, default=0.5, help="weight of L_rel (0: off)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: Table A9, by stage)")
    p.add_argument("--global_batch_size", type=int, help="default: Table A9, by stage")
    p.add_argument("--batch_size", type=int, default=4, help="per process")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--max_steps", type=int, help="stop after this many steps of the stage (resumed or not)")
    p.add_argument("--save_every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")
    p = sub.add_parser("eval", help="exact-match accuracy on held-out questions")
    p.add_argument("--model", required=True, nargs="+", help="one or more checkpoint dirs")
    p.add_argument("--data", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--results", help="append {row, seed, accuracy} to this JSON-lines file")
    p.add_argument("--row", nargs="+", help="the table row name of each --model")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("table", help="mean and spread over seeds of the eval results")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True, help="the table as Markdown")
    p.add_argument("--seconds", type=int, help="wall time of the run, printed under the table")
    a = ap.parse_args(argv)
    if a.cmd == "toy":
        make_toy(a.out, a.seed)
    elif a.cmd == "train":
        train(a)
    elif a.cmd == "eval":
        for model, row in zip(a.model, a.row or a.model):
            acc = evaluate(model, a.data, a.images)
            print(f"exact match {acc:.4f} on {a.data} ({model})")
            if a.results:
                with open(a.results, "a") as f:
                    f.write(json.dumps({"row": row, "seed": a.seed, "accuracy": acc}) + "\n")
    else:
        print(table(a.results, a.out, a.seconds))


if __name__ == "__main__":
    main()
