"""LLaVA-KD (ICCV 2025, arXiv 2410.16236), minimal and exact.

    python llava_kd.py train --stage dpt --data JSON --images DIR --out DIR
        --vision DIR --llm DIR --teacher DIR
    torchrun --standalone --nproc_per_node=8 llava_kd.py train --stage dft ... --init DIR
        --teacher DIR [--fsdp]
    bash train.sh    # the whole recipe; the toy one with no settings (README)

Each stage writes OUT/ (the model and its processor, stock), OUT/log.jsonl (each step's terms, lr,
grad_norm, tokens/s, memory; `llava_kd.py plot OUT` draws it) and OUT/checkpoint/. Top to bottom, as
the paper: the losses (Sec. 3: MDist = L_res + L_vis, RDist = L_rel, their sum L_DPT / L_DFT), the
model and the stage table (Table A9), the training loop. The rest: README's map."""

import contextlib
import dataclasses
import functools
import math
import os
import time
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import data
import errors
import evaluation
import flags
import memory
import models
import plot
import processes
import signals

# --------------------------------------------------------------------------------------------------
# Losses (paper Sec. 3), plain tensors in: copy this section as is. logits [B, T, V]; labels [B, T],
# -100 but on answer tokens; visual_mask [B, T], True on image tokens. Math in float32 at least, KL
# on the shared vocabulary; a mean divides a sum once, by its count or the one given (global batch).


# The five terms, in the paper's order: L_reg + alpha L_res + beta L_vis + gamma L_rel (+ delta
# L_pro); `counts` (the global batch's): TERMS[1:]'s rows (answer, visual, with an image, prompt)
TERMS = ("L_reg", "L_res", "L_vis", "L_rel", "L_pro")


def next_tokens(labels):
    """[B, T]: the answer token that each row of logits predicts (row m-1 predicts m), else -100."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def response_rows(labels):
    """[B, T] bool: the rows of logits that predict an answer token."""
    return next_tokens(labels) != -100


def prompt_rows(labels, visual_mask, attention_mask=None):
    """Table A6's prompt tokens: the rows that are neither answer, visual nor padding."""
    rows = ~response_rows(labels) & ~visual_mask
    return rows if attention_mask is None else rows & attention_mask.bool()


# log phi(Y_j) = Y_j - log sum_i exp(Y_i), in float32 at least: [N, V] logits -> log-probabilities
def log_probs(logits):
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


# KLD(phi_l, phi_s) = sum_{j=1}^{V} phi_l(Y_j) log(phi_l(Y_j) / phi_s(Y_j)), one value a row: [N]
def kl_per_row(log_p_s, log_p_t):
    return F.kl_div(log_p_s, log_p_t.detach(), log_target=True, reduction="none").sum(-1)


# -log phi_s(y_m | y_<m), one value a row: [N]; 0 where the target is -100
def nll_per_row(log_p_s, targets):
    return F.nll_loss(log_p_s, targets, reduction="none")


def mean_kl(student_logits, teacher_logits, rows, num_rows=None):
    """KLD averaged over the rows where `rows` is True, on the vocabulary the models share."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    kl = kl_per_row(log_probs(student_logits[rows][:, :v]), log_probs(teacher_logits[rows][:, :v]))
    return kl.sum() / (num_rows or rows.sum().clamp_min(1))


# L_res = (1/M) sum_{m=1}^{M} KLD(phi_l(y_m | y_<m), phi_s(y_m | y_<m)), over the M answer tokens
def response_loss(student_logits, teacher_logits, labels, num_rows=None):
    return mean_kl(student_logits, teacher_logits, response_rows(labels), num_rows)


# L_vis = (1/K) sum_{k=1}^{K} KLD(phi_l(Y | y_<k), phi_s(Y | y_<k)), over the K image tokens
def visual_loss(student_logits, teacher_logits, visual_mask, num_rows=None):
    return mean_kl(student_logits, teacher_logits, visual_mask, num_rows)


# L_rel = 1 - Cos(R_v^s, R_v^t) = 1 - (R_v^s . R_v^t) / (||R_v^s|| ||R_v^t||), one sample.
# Sums in float64: 1 - cos is small (~5e-3), and float32 sums of K^2 products lose its first digits.
def relation_distance(R_s, R_t):
    R_s, R_t = R_s.double(), R_t.double()
    norms = torch.sqrt(torch.sum(R_s * R_s) * torch.sum(R_t * R_t))
    return 1 - torch.sum(R_s * R_t) / norms.clamp_min(1e-16)


# R_v = y_v (x) y_v = Y Y^T (K x K), Y one sample's visual rows (logits, or features of any width);
# L_rel averaged over the samples that have an image
def relation_loss(student_feats, teacher_feats, visual_mask, num_samples=None):
    dtype = torch.promote_types(student_feats.dtype, torch.float32)
    total = student_feats[..., :0].sum().to(dtype)  # 0 in the graph: backprops with no image too
    for b in visual_mask.any(1).nonzero().flatten().tolist():
        Y_s = student_feats[b][visual_mask[b]].to(dtype)
        Y_t = teacher_feats[b][visual_mask[b]].detach().to(dtype)
        total = total + relation_distance(Y_s @ Y_s.T, Y_t @ Y_t.T).to(total.dtype)
    return total / (num_samples or visual_mask.any(1).sum().clamp_min(1))


# L_reg = -(1/M) sum_{m=1}^{M} log phi_s(y_m | y_<m): the student's own loss, alone in pt and sft
def next_token_loss(student_logits, labels, num_rows=None):
    rows = response_rows(labels)
    nll = nll_per_row(log_probs(student_logits[rows]), next_tokens(labels)[rows])
    return nll.sum() / (num_rows or rows.sum().clamp_min(1))


# L_DPT = L_DFT = L_reg + alpha L_res + beta L_vis + gamma L_rel, (alpha, beta, gamma) = (1, 1, 0.5)
# [+ delta L_pro, Table A6's prompt tokens]; returned without L_reg. A term of weight 0 is 0.
# counts: answer rows, visual rows, samples with an image, prompt rows (of the global batch).
def distill_loss(
    student_logits,
    teacher_logits,
    labels,
    visual_mask,
    alpha=1.0,
    beta=1.0,
    gamma=0.5,
    *,
    delta=0.0,
    attention_mask=None,
    counts=(None,) * 4,
):
    s, t = student_logits, teacher_logits
    v = min(s.shape[-1], t.shape[-1])
    prompt = prompt_rows(labels, visual_mask, attention_mask)
    zero = s.new_zeros((), dtype=torch.float32)
    terms = {
        "L_res": response_loss(s, t, labels, counts[0]) if alpha else zero,
        "L_vis": visual_loss(s, t, visual_mask, counts[1]) if beta else zero,
        "L_rel": relation_loss(s[..., :v], t[..., :v], visual_mask, counts[2]) if gamma else zero,
        "L_pro": mean_kl(s, t, prompt, counts[3]) if delta else zero,
    }
    loss = sum(w * x for w, x in zip((alpha, beta, gamma, delta), terms.values()))
    return loss, {k: x.detach() for k, x in terms.items()}


# The lean path: the same loss from each model's last hidden states h [B, T, D] and head W [V, D].
def fused_loss(
    h_s,
    w_s,
    labels,
    visual_mask=None,
    h_t=None,
    w_t=None,
    alpha=1.0,
    beta=1.0,
    gamma=0.5,
    *,
    delta=0.0,
    attention_mask=None,
    m_s=None,
    m_t=None,
    counts=(None,) * 4,
    block=2**26,
):
    """(loss, terms) = next_token_loss + distill_loss on (h_s W_s^T, h_t W_t^T), or L_reg alone.
    m_s, m_t: W^T W (lean_relation); block: logits a block. Masks on the CPU: no wait on the GPU."""
    teacher = h_t is not None
    device = h_s.device
    # GEMMs in the dtype of the model's own head (bf16 under autocast), the rest in float32 at least
    amp = torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)
    gemm_dtype = torch.get_autocast_dtype(device.type) if amp else h_s.dtype
    acc_dtype = torch.promote_types(h_s.dtype, torch.float32)
    weights = dict(zip(TERMS, (1.0, alpha, beta, gamma, delta) if teacher else (1.0, 0, 0, 0, 0)))
    terms = loss_rows(labels, visual_mask, attention_mask, weights, counts, device, acc_dtype)
    n, scale, rows, in_term, a, b, target, rel_rows, K = terms
    h = h_s.detach().flatten(0, 1)
    w = w_s.detach()
    w_gemm = w.to(gemm_dtype)  # a copy only under autocast
    V = len(w)
    v = min(V, len(w_t)) if teacher else V  # the shared vocabulary
    h_t = h_t.detach().flatten(0, 1) if teacher else None
    w_t_gemm = w_t.detach()[:v].to(gemm_dtype) if teacher else None
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    dL_dh = torch.zeros(h.shape, dtype=acc_dtype, device=device)
    dL_dW = None
    with torch.autocast(device.type, enabled=False) if amp else contextlib.nullcontext():
        if K:  # L_rel first, on the shared vocabulary, from [K, D] and [D, D] tensors
            heads = (w[:v], w_t.detach()[:v], m_s, m_t, w_gemm if w_s.requires_grad else None)
            sums[4], dL_dH, dL_dW = lean_relation(h[rel_rows], h_t[rel_rows], K, scale[4], *heads)
            dL_dh.index_add_(0, rel_rows, dL_dH)
        for start in range(0, len(rows), max(1, block // V)):
            part = slice(start, start + max(1, block // V))
            h_block = h[rows[part]].to(gemm_dtype)
            kd = (h_t[rows[part]].to(gemm_dtype), w_t_gemm) if teacher else ()
            nll, kl, G = lean_block(h_block, w_gemm, target[part], a[part], b[part], *kd)
            sums[:4] += (torch.stack([nll, kl, kl, kl], 1) * in_term[part]).sum(0)
            dL_dh.index_add_(0, rows[part], matmul(G, w_gemm, acc_dtype))  # Y = h W^T: dL/dh = G W
            if w_s.requires_grad:  # dL/dW = G^T h
                dL_dW = matmul(G.T, h_block, acc_dtype, dL_dW)
            del G  # before the next block's
    if w_s.requires_grad and dL_dW is None:  # no row in any term
        dL_dW = torch.zeros_like(w, dtype=acc_dtype)
    loss = (sums * to_device(scale, device)).sum().to(acc_dtype)
    loss = _GivenGradients.apply(loss, h_s, w_s, dL_dh.view(h_s.shape), dL_dW)
    names = BLOCK_ORDER if teacher else BLOCK_ORDER[:1]
    return loss, dict(zip(names, (sums / to_device(n, device)).to(acc_dtype)))


# fused_loss's order of the terms: those a block sums row by row, the KL ones together, then L_rel
BLOCK_ORDER = ("L_reg", "L_res", "L_vis", "L_pro", "L_rel")


def loss_rows(labels, visual_mask, attention_mask, weights, counts, device, dtype):
    """Where the masks are (the loop: the CPU): each term's rows (answer, visual, prompt), count
    (counts', else this batch's; L_rel: samples with an image) and weight. In BLOCK_ORDER: (n, scale
    = weight / n, the rows the blocks take, the terms each is in, its weight in L_reg (a) and the
    KLs (b), its next token; L_rel's rows, K of them a sample) on `device`, weights in `dtype`."""
    visual_mask = torch.zeros_like(labels, dtype=torch.bool) if visual_mask is None else visual_mask
    answer = response_rows(labels)
    prompt = prompt_rows(labels, visual_mask, attention_mask)
    rows_of = dict(L_reg=answer, L_res=answer, L_vis=visual_mask, L_pro=prompt)
    given = dict(zip(TERMS, (counts[0], *counts)))  # L_reg is a mean over the answer rows too
    found = {k: m.sum() for k, m in rows_of.items()} | {"L_rel": visual_mask.any(1).sum()}
    n = [float(given[k]) if given[k] is not None else max(int(found[k]), 1) for k in BLOCK_ORDER]
    n = torch.tensor(n, dtype=torch.float64)
    scale = torch.tensor([weights[k] for k in BLOCK_ORDER], dtype=torch.float64) / n
    in_term = torch.stack([rows_of[k].flatten() & (weights[k] != 0) for k in BLOCK_ORDER[:4]], 1)
    rows = in_term.any(1).nonzero().flatten()  # the rows the blocks take
    in_term = in_term[rows].double()
    a = in_term[:, 0] * scale[0]
    b = in_term[:, 1:] @ scale[1:4]
    target = next_tokens(labels).flatten()[rows]
    rel = visual_mask if weights["L_rel"] else torch.zeros_like(visual_mask)
    rel_rows = rel.flatten().nonzero().flatten()  # L_rel's rows, sample by sample
    K = [k for k in rel.sum(1).tolist() if k]  # K of them for each sample with an image
    rows, target, rel_rows = (to_device(x, device) for x in (rows, target, rel_rows))
    in_term, a, b = (to_device(x.to(dtype), device) for x in (in_term, a, b))
    return n, scale, rows, in_term, a, b, target, rel_rows, K


def lean_block(h, w, target, a, b, h_t=None, w_t=None):
    """One block of rows: -log phi_s(y) and KLD, one value a row, and dL/dY_s (G, in w's dtype),
    the softmax's gradients without autograd. a, b [N]: each row's weight in L_reg, in the KLs."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a[:, None], b[:, None]
    V = len(w)
    # log phi_s(Y_s), Y_s = h W_s^T on this block's rows only, float32 at least
    log_p_s = log_probs(matmul(h, w.T, dtype))
    nll = nll_per_row(log_p_s, target)
    kl = torch.zeros_like(nll)
    # dL/dY_s = a (phi_s - onehot(y)) + b (phi_s - phi_t), the gradients of -log phi_s(y) and of
    # KLD, = c phi_s - q with c = a + b, q = a onehot(y) + b phi_t
    c = a + b
    if h_t is not None:
        v = len(w_t)  # the shared vocabulary
        log_p_t = log_probs(matmul(h_t, w_t.T, dtype))
        p_t = log_p_t.exp()
        # the student's log phi_s' on the shared vocabulary (log_softmax ignores a shift)
        log_p_sv = log_p_s if v == V else log_probs(log_p_s[:, :v])
        # KLD = sum_j phi_t log phi_t - sum_j phi_t log phi_s', two dot products a row
        kl = rowdot(p_t, log_p_t) - rowdot(p_t, log_p_sv)
        del log_p_t
        if v < V:  # KLD's gradient is b (phi_s' - phi_t), on the shared vocabulary only
            p_t, c = F.pad(p_t.sub_(log_p_sv.exp()), (0, V - v)), a
    minus_q = p_t.mul_(-b) if h_t is not None else torch.zeros_like(log_p_s)
    minus_q.scatter_add_(1, target[:, None].clamp_min(0), -a)  # a = 0 where y = -100
    G = torch.empty(minus_q.shape, dtype=w.dtype, device=w.device)
    torch.addcmul(minus_q, log_p_s.exp_(), c, out=G)  # G = c phi_s - q, rounded once
    return nll, kl, G


def lean_relation(H_s, H_t, K, scale, w_s, w_t, m_s=None, m_t=None, w_gemm=None):
    """L_rel of samples of K visual rows each: R = Y Y^T = H M H^T, M = W^T W on the shared
    vocabulary (m_s, m_t when given), never [K, V]. (its sum, dL/dH, dL/dW when the student's whole
    head w_gemm is given: W (dL/dM + dL/dM^T) on the shared rows, 0 on the others)."""
    m_s = head_gram(w_s) if m_s is None else m_s
    dtype = m_s.dtype  # float32 at least
    M_s = m_s.detach().requires_grad_()
    H_s = H_s.to(dtype).requires_grad_()
    R_t = teacher_relations(H_t.to(dtype).split(K), w_t, m_t, dtype)
    with torch.enable_grad():
        R_s = [H @ M_s @ H.T for H in H_s.split(K)]
        relation = sum(relation_distance(a, b) for a, b in zip(R_s, R_t))
        dL_dH, dL_dM = torch.autograd.grad(relation * float(scale), (H_s, M_s))
    dL_dM = dL_dM + dL_dM.T
    dL_dW = None if w_gemm is None else matmul(w_gemm, dL_dM.to(w_gemm.dtype), dtype)
    if dL_dW is not None and len(w_s) < len(dL_dW):
        dL_dW[len(w_s) :] = 0  # rows beyond the teacher's vocabulary
    return relation.detach(), dL_dH, dL_dW


def teacher_relations(H_t, w_t, m_t, dtype, chunk=2**14):
    """R_t = Y_t Y_t^T of each sample's visual rows H [K, D]: H M_t H^T from M_t = W_t^T W_t (m_t,
    or made here: 2 V D^2 products), or where that is fewer (2 V K (D + K) a sample: a wide head, a
    call's few samples) from Y_t = H W_t^T, [K, chunk] of the vocabulary at a time."""
    D = w_t.shape[1]
    if m_t is not None or D * D <= sum(len(H) * (D + len(H)) for H in H_t):
        M_t = (head_gram(w_t) if m_t is None else m_t).to(dtype)
        return [H @ M_t @ H.T for H in H_t]
    R_t = [H.new_zeros(len(H), len(H)) for H in H_t]
    for start in range(0, len(w_t), chunk):
        w = w_t[start : start + chunk].to(dtype)
        for R, H in zip(R_t, H_t):
            Y = H @ w.T
            R.addmm_(Y, Y.T)
    return R_t


def rowdot(x, y):
    """Each row's sum_j x_j y_j, [N, V] -> [N]: one batched product, summed in chunks of the row
    (V over its largest power-of-two factor) so that float32 sums of a few thousand terms add up."""
    k = x.shape[1] & -x.shape[1]
    return torch.einsum("nkv,nkv->nk", x.unflatten(1, (k, -1)), y.unflatten(1, (k, -1))).sum(1)


def head_gram(w):
    """M = W^T W in float32 at least: [V, D] -> [D, D]."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    return w.T @ w


def matmul(x, y, dtype, out=None):
    """x @ y (+ out, in place) in `dtype`. CUDA's bf16 GEMMs sum and write in float32 (meta, the
    benches' device, takes the same path on shapes alone); elsewhere a bf16 product is cast."""
    if x.dtype == dtype:
        return x @ y if out is None else out.addmm_(x, y)
    if x.device.type not in ("cuda", "meta"):
        return (x @ y).to(dtype) if out is None else out.add_(x @ y)
    if out is None:
        return torch.mm(x, y, out_dtype=dtype)
    return torch.addmm(out, x, y, out_dtype=dtype, out=out)


def to_device(x, device):
    """A small tensor to h's device; from the CPU to CUDA a pinned copy (the host does not wait)."""
    pinned = x.pin_memory() if device.type == "cuda" and x.device.type == "cpu" else x
    return pinned.to(device, non_blocking=True)


class _GivenGradients(torch.autograd.Function):
    """The loss of (h, W) with its gradients computed alongside: backward only scales them."""

    @staticmethod
    def forward(ctx, loss, h, w, dL_dh, dL_dW):
        ctx.save_for_backward(dL_dh, dL_dW)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        grads = [None if g is None else g * grad.to(g.dtype) for g in ctx.saved_tensors]
        return None, *grads, None, None


# --------------------------------------------------------------------------------------------------
# Model: transformers' LlavaForConditionalGeneration, vision tower -> 2-layer GELU MLP projector
# -> LLM. Every checkpoint written here loads with stock from_pretrained; any HF LLaVA can teach.


def vision_features(model, pixel_values):
    """Z_v: the frozen vision tower's selected hidden states, before the projector. Teacher and
    student share the tower, so this is computed once a batch and handed to both projectors."""
    c = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    hidden = out.hidden_states[c.vision_feature_layer]
    if c.vision_feature_select_strategy == "default":
        return hidden[:, 1:]  # CLIP's CLS dropped
    return hidden


def llava_hidden(model, input_ids, attention_mask, z_v):
    """LLaVA's forward from Z_v to the LLM's last hidden states [B, T, D]: H_v = projector(Z_v) goes
    on the image-token positions of the text embeddings, then the LLM runs. The head (logits = h
    W^T) is left to the loss, which applies it a block at a time."""
    embeds = model.get_input_embeddings()(input_ids)
    projector = model.model.multi_modal_projector
    if z_v is None:  # text only: no features, but the projector stays in the graph (a zero
        # gradient), so every process's DDP buckets and FSDP2 reduce-scatters hold the same tensors
        z_v = embeds.new_zeros(0, 0, projector.linear_1.in_features)
    mask = input_ids == model.config.image_token_id
    h_v = projector(z_v)
    if int(mask.sum()) != h_v.shape[0] * h_v.shape[1]:
        raise ValueError(f"{int(mask.sum())} image tokens for {tuple(h_v.shape[:2])} features")
    embeds = embeds.masked_scatter(mask[..., None], h_v.to(embeds.dtype))
    llm = model.model.language_model
    # use_cache=False: else the LLM builds a KV cache of every layer (the model's config.use_cache
    # does not reach it; text_config's is True), 400 KB a token for Qwen1.5-4B
    out = llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


# The stages (paper Sec. 3): a teacher or not, the parts that train (never the vision tower:
# freezing is this table), the chat template (sft, dft) or the captioning one (pt, dpt)
STAGES = {
    "pt": dict(teacher=False, trains=("projector",), chat=False),
    "dpt": dict(teacher=True, trains=("projector",), chat=False),
    "sft": dict(teacher=False, trains=("projector", "llm"), chat=True),
    "dft": dict(teacher=True, trains=("projector", "llm"), chat=True),
}
# Table A9: AdamW, cosine decay after a linear warm-up, gradients clipped at this norm
TABLE_A9 = {
    "pt": dict(lr=1e-3, global_batch=256, epochs=1, warmup_ratio=0.03, weight_decay=0.0, clip=1.0),
    "dpt": dict(lr=1e-3, global_batch=256, epochs=1, warmup_ratio=0.03, weight_decay=0.0, clip=1.0),
    "sft": dict(lr=2e-5, global_batch=128, epochs=1, warmup_ratio=0.03, weight_decay=0.0, clip=1.0),
    "dft": dict(lr=2e-5, global_batch=128, epochs=1, warmup_ratio=0.03, weight_decay=0.0, clip=1.0),
}
PARTS = {
    "vision": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "llm": ("model.language_model.", "lm_head."),
}


def apply_stage(model, stage):
    """requires_grad on exactly the parts that STAGES[stage] trains; everything else frozen."""
    prefixes = tuple(p for part in STAGES[stage]["trains"] for p in PARTS[part])
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))


# --------------------------------------------------------------------------------------------------
# Training: one plain loop for the four stages (nanoGPT's), one process or torchrun: DDP or FSDP2.


class Student(torch.nn.Module):
    """What DDP or FSDP wraps: the student from Z_v (shared with the teacher) to its loss, so every
    parameter the loss reaches (the head too) is in it. Held here, not passed to forward (FSDP2
    casts its floating inputs to bf16): m_t, the teacher's W_t^T W_t, and W_s^T W_s, once a step."""

    def __init__(self, llava, m_t=None):
        super().__init__()
        self.llava = llava
        self.m_t = m_t
        self.m_s = (None, None)  # (the step it is of, W_s^T W_s)

    def forward(self, input_ids, attention_mask, z_v, cpu, h_t, w_t, weights, counts, step=None):
        """cpu: the CPU batch's masks in a namespace (DDP and FSDP2 move a tensor argument to the
        GPU): fused_loss reads its rows there, no host sync. step: the weights' step, or None."""
        h_s = llava_hidden(self.llava, input_ids, attention_mask, z_v)
        alpha, beta, gamma, delta = weights
        w_s = self.llava.lm_head.weight
        relation = h_t is not None and gamma
        key = step if w_s.requires_grad else "frozen"  # a frozen head's: once a run
        if relation and (step is None or self.m_s[0] != key):
            with torch.autocast(w_s.device.type, enabled=False):
                shared = w_s.detach()[: min(len(w_s), len(w_t))]
                self.m_s = (key, head_gram(shared))
        m_s = self.m_s[1] if relation else None
        kw = dict(delta=delta, attention_mask=cpu.attention_mask, m_s=m_s, m_t=self.m_t)
        args = (h_s, w_s, cpu.labels, cpu.visual_mask, h_t, w_t, alpha, beta, gamma)
        return fused_loss(*args, **kw, counts=counts, block=memory.LOSS_BLOCK[h_s.device.type])


def teacher_gram(teacher, model):
    """M_t = W_t^T W_t on the shared vocabulary, fixed for the run: L_rel's teacher side, [D, D]."""
    v = min(len(teacher.lm_head.weight), len(model.lm_head.weight))
    return head_gram(teacher.lm_head.weight[:v].detach())


def stage_loss(
    runner, llava, teacher, batch, weights=(1.0, 1.0, 0.5, 0.0), counts=(None,) * 4, step=None
):
    """One micro-batch's loss: L_reg (+ alpha L_res + beta L_vis + gamma L_rel + delta L_pro with a
    teacher). `runner` runs the student (Student, or DDP or FSDP2 around it), `llava` is its LLaVA,
    `batch` the CPU's (pinned on CUDA)."""
    device = llava.lm_head.weight.device
    b = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    visual = batch["input_ids"] == llava.config.image_token_id
    masks = dict(labels=batch["labels"], attention_mask=batch["attention_mask"])
    cpu = types.SimpleNamespace(**masks, visual_mask=visual)
    with torch.no_grad():  # the frozen, shared vision tower: Z_v once for both models
        z_v = None
        if b["pixel_values"] is not None:
            z_v = vision_features(llava, b["pixel_values"])
        h_t = w_t = None
        if teacher is not None:
            # a student that kept its own tower: the teacher reads the images with its own
            own = teacher.model.vision_tower is not llava.model.vision_tower
            z_t = vision_features(teacher, b["pixel_values"]) if own and z_v is not None else z_v
            h_t = llava_hidden(teacher, b["input_ids"], b["attention_mask"], z_t)
            w_t = teacher.lm_head.weight
    ids, mask = b["input_ids"], b["attention_mask"]
    loss, terms = runner(ids, mask, z_v, cpu, h_t, w_t, weights, counts, step)
    return loss, {k: v.detach() for k, v in terms.items()}


def lr_at(step, total, peak, warmup_ratio):
    """Linear warm-up over the first 3% of the steps, then cosine decay to 0 (Table A9)."""
    warmup = max(1, math.ceil(total * warmup_ratio))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def term_rows(b, image_id):
    """A micro-batch's rows of each of TERMS: answer, answer, visual, with an image, prompt."""
    visual = b["input_ids"] == image_id
    labels, attention = b["labels"], b["attention_mask"]
    answer = response_rows(labels)
    kinds = [answer, answer, visual, visual.any(1), prompt_rows(labels, visual, attention)]
    return [int(m.sum()) for m in kinds]


def global_counts(micro, image_id, device, ddp, world):
    """Answer rows, visual rows, samples with an image and prompt rows of the whole global batch
    (every micro-batch and process), and its tokens. Each loss is a mean over the global batch: sums
    divided by these counts (not each micro-batch's own), so N processes compute what one would."""
    rows = []
    for b in micro:
        if b["errors"]:  # an image did not decode, or a loader worker died: nothing else in it
            rows.append([0] * 5 + [len(b["errors"])])
            continue
        rows.append(term_rows(b, image_id)[1:] + [int(b["attention_mask"].sum()), 0])
    count = torch.tensor(rows, dtype=torch.float64).sum(0).to(device)
    if ddp:
        dist.all_reduce(count)
    # / world: DDP and FSDP average the gradients over the processes
    return [max(float(c), 1.0) / world for c in count[:4]], float(count[4]), bool(count[5])


def check_before_loading(a, device, world, rank):
    """Everything a run reads before any weights load: flags, data, the checkpoint to resume, the
    memory plan, answers' lengths. No collective: each process checks its share of the data alone,
    run_on_every_process stops all on one error. None: nothing to train (--plan, or finished)."""
    stage = STAGES[a.stage]
    world = a.plan_gpus or world  # --plan_gpus: the plan of that many GPUs, from the configs alone
    global_batch = flags.check_flags(a, world, stage, TABLE_A9[a.stage])
    digest = None if a.plan_gpus else data.sources_sha256(a.data)
    how = checkpoints.how_to_start(a, rank == 0, digest)
    if how == "skip":  # finished before: nothing to do
        return None
    plan = a.plan or bool(a.plan_gpus)  # --plan_gpus: the plan of another machine
    samples = [] if a.plan_gpus else data.read_sources(a.data, a.images, rank, world)
    if len(samples) < global_batch and not a.plan_gpus:
        raise errors.UserError(
            f"{data.label(a.data)}: {len(samples)} samples are fewer than one global batch "
            f"({global_batch}); lower --global_batch_size"
        )
    if not plan:
        checkpoints.claim_out(a, rank == 0, how == "resume")
    ckpt = checkpoints.find_checkpoint(a.out) if how == "resume" else None
    source = ckpt or a.init
    s_proc = transformers.AutoProcessor.from_pretrained(source) if source else None
    # the memory plan, from the configs alone: it stops a run that would not fit before it loads
    student = memory.meta_llava(source, a.vision, a.llm)
    apply_stage(student, a.stage)
    teacher = memory.meta_llava(a.teacher) if stage["teacher"] else None
    if teacher is not None:  # from configs and processors: no weight read yet
        models.check_teacher(student, teacher, s_proc, a.vision, a.teacher)
    checkpointing = memory.check_memory(a, world, device, student, teacher, rank == 0, global_batch)
    if plan:
        return None
    state = None
    if ckpt:  # the same flags as the checkpoint's, but those that may change
        state = checkpoints.read_train_state(os.path.join(ckpt, "train_state.pt"))
        checkpoints.check_resume(a, state["args"], digest)
    length_args = (s_proc, source, a, stage["chat"], samples, rank, world)  # the processor alone
    left_out = data.check_lengths(*length_args) if source else []
    held_out = evaluation.read(a, s_proc, source, stage["chat"], rank, world)
    return types.SimpleNamespace(
        global_batch=global_batch,
        samples=samples,
        state=state,
        source=source,
        left_out=left_out,
        held_out=held_out,
        digest=digest,
        checkpointing=checkpointing,
    )


@dataclasses.dataclass
class Run:
    """A stage's run as the loop reads it (set_up makes it; no other file reads it)."""

    model: torch.nn.Module  # the student's LLaVA
    processor: transformers.ProcessorMixin
    teacher: torch.nn.Module | None
    student: torch.nn.Module  # what runs the student: Student, or DDP or FSDP2 around it
    params: list  # the trained parameters, in AdamW's order
    names: list  # their names in Student (AdamW's state is saved by name)
    opt: torch.optim.Optimizer
    ds: data.LlavaDataset
    held_out: types.SimpleNamespace | None  # --eval_data: its data set, this process's share
    table: dict  # TABLE_A9[stage], with --lr, --epochs
    global_batch: int
    accum: int  # micro-steps a step, each process
    total: int  # the schedule's steps
    end: int  # the step this run stops at: total, or --max_steps
    step: int  # the step it starts at
    args: dict  # the flags and the data's SHA-256: what a checkpoint and done.json record


def place_models(a, model, teacher, checkpointing, ddp, cuda, device):
    """The student's LLaVA on its device in its modes, wrapped for training (DDP or FSDP2), and the
    teacher beside it: (what runs the student, the teacher)."""
    apply_stage(model, a.stage)
    model.to(device)
    memory.hold_frozen_in_bf16(model, cuda)
    # train mode (from_pretrained gives eval: transformers checkpoints activations only in train
    # mode); the vision tower, frozen and shared with the teacher, stays in eval mode as the teacher
    model.train()
    model.model.vision_tower.eval()
    if checkpointing:  # transformers 5.x: activation_checkpointing_enable, the new name
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    teacher = teacher.to(device) if teacher is not None else None
    m_t = teacher_gram(teacher, model) if teacher is not None and a.gamma else None
    student = Student(model, m_t)
    if a.fsdp:
        return processes.shard(student, model, cuda, teacher), teacher
    if ddp:
        # every trained parameter is in every micro-batch's graph (llava_hidden): no search for
        # unused ones; the gradients live in DDP's buckets (no second copy)
        ids = [device.index] if cuda else None
        student = DDP(student, device_ids=ids, gradient_as_bucket_view=True)
    return student, teacher


def set_up(a, ddp, cuda, device, rank, world):
    """What a stage needs before its first step: the checks (flags and every sample first: a typo
    costs seconds, not a teacher's loading time), the models placed, AdamW, the schedule and the
    step to resume at. None: nothing to train."""
    checked = processes.run_on_every_process(check_before_loading, a, device, world, rank)
    processes.print_notes(rank == 0)
    if checked is None:  # --plan printed, or the stage had finished
        return None
    global_batch, state = checked.global_batch, checked.state
    model, processor, teacher, ds, left_out, held_out = processes.run_on_every_process(
        models.load_stage, a, STAGES[a.stage], checked, cuda, world, rank
    )
    processes.print_notes(rank == 0)
    if a.drop_too_long:
        data.leave_out(ds, processes.gather_lists(left_out), global_batch, a.out, rank == 0)
    student, teacher = place_models(a, model, teacher, checked.checkpointing, ddp, cuda, device)
    params = [p for p in model.parameters() if p.requires_grad]
    names = ["llava." + n for n, p in model.named_parameters() if p.requires_grad]  # Student's
    table = TABLE_A9[a.stage] | {k: getattr(a, k) for k in ("lr", "epochs") if getattr(a, k)}
    # fused on CUDA: one kernel, without the foreach step's full-size temporaries (not under FSDP:
    # its sharded parameters are DTensors, and fused AdamW on them has not run here)
    fused = cuda and not a.fsdp
    opt = torch.optim.AdamW(params, lr=table["lr"], weight_decay=table["weight_decay"], fused=fused)
    total = len(ds) // global_batch * table["epochs"]
    if state is not None:
        if (state["total"], state["global_batch"]) != (total, global_batch):
            raise errors.agreed_error(  # every process read the same checkpoint
                f"--resume: the checkpoint in {a.out} was written for {state['total']} steps of "
                f"{state['global_batch']}, not {total} of {global_batch}: another data size"
            )
        checkpoints.load_optimizer(student, opt, state["optimizer"], a.fsdp, names)
    return Run(
        model=model,
        processor=processor,
        teacher=teacher,
        student=student,
        params=params,
        names=names,
        opt=opt,
        ds=ds,
        held_out=held_out,
        table=table,
        global_batch=global_batch,
        accum=global_batch // (a.batch_size * world),
        total=total,
        end=total if a.max_steps is None else min(total, a.max_steps),
        step=0 if state is None else state["step"],
        args=dict(vars(a), data_sha256=checked.digest),
    )


def save(a, r, master, done):
    """out/checkpoint after `done` steps (checkpoints.save)."""
    state = dict(step=done, total=r.total, global_batch=r.global_batch, seed=a.seed, args=r.args)
    checkpoints.save(a.out, state, r.model, r.processor, r.student, r.opt, r.names, a.fsdp, master)


def forward_backward(a, r, micro, counts, ddp, device, step):
    """The forward and backward of this process's micro-batches of one step, their gradients summed.
    [7] float64 on the device: the loss, its five terms, and a slot for the stop request."""
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    weights = (a.alpha, a.beta, a.gamma, a.delta)
    logged = torch.zeros(7, dtype=torch.float64, device=device)
    for i, b in enumerate(micro):
        # DDP: only the last micro-step all-reduces the gradients. FSDP2: every micro-step
        # reduce-scatters within a node (else each process holds every gradient whole in float32:
        # ~15 GiB for the 4B teacher), only the last all-reduces the shards across nodes (HSDP)
        last = i == len(micro) - 1
        if a.fsdp:
            r.student.set_requires_all_reduce(last)
        no_sync = ddp and not a.fsdp and not last
        sync = r.student.no_sync() if no_sync else contextlib.nullcontext()
        with sync, autocast:
            loss, terms = stage_loss(r.student, r.model, r.teacher, b, weights, counts, step)
        loss.backward()
        values = [loss.detach()] + [terms.get(k, torch.zeros_like(loss)) for k in TERMS]
        logged[:6] += torch.stack(values).double()
    return logged


def micro_batches(a, r, rank, world, cuda):
    """This process's micro-batches from the run's first step on (data.micro_batches)."""
    seed_order = (r.ds, r.global_batch, a.batch_size, world, rank, a.seed)
    order_of = functools.partial(data.epoch_order, *seed_order, grouped=a.group_by_length)
    pad_id = r.processor.tokenizer.pad_token_id
    loader = data.loader_options(a.batch_size, pad_id, a.workers, cuda)
    per_step = r.accum * a.batch_size
    steps_per_epoch = len(r.ds) // r.global_batch
    return data.micro_batches(r.ds, order_of, per_step, steps_per_epoch, r.step, loader)


def optimizer_step(a, r, ddp):
    """Gradients clipped (Table A9), AdamW's step, gradients zeroed: (the norm before clipping,
    this process's bytes of trained parameters, gradients and AdamW state)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(r.params, r.table["clip"])
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    r.opt.step()
    held = memory.trained_bytes(r.params, r.opt)
    # DDP: zeroed in place, so the gradients stay views into DDP's buckets (set to None, the next
    # no_sync micro-step would make fresh ones beside the buckets: a second copy)
    r.opt.zero_grad(set_to_none=not (ddp and not a.fsdp))
    return grad_norm, held


def log_record(r, step, host, grad_norm, tokens, seconds, device, held):
    """log.jsonl's line of a step: the loss and its terms (the step's means), lr, the gradient's
    norm, the time, tokens/s and memory."""
    rec = dict(zip(("loss",) + TERMS, host))
    peak, reserved = memory.peaks(device, step)
    rec.update(
        step=step + 1,
        lr=r.opt.param_groups[0]["lr"],
        grad_norm=grad_norm.item(),
        seconds=seconds,
        tokens_per_s=tokens / seconds,
        peak_gib=peak / 2**30,
        peak_reserved_gib=reserved / 2**30,
        trained_gib=held / 2**30,
    )
    return rec


def evaluate(a, r, cuda, done, log):
    """--eval_data after `done` steps (evaluation.evaluate) into log (rank 0's; None elsewhere):
    stage_loss's sums (counts of 1); W_s^T W_s made of the weights the next step, `done`, reuses."""
    weights = (a.alpha, a.beta, a.gamma, a.delta)
    run = (r.student, r.model, r.teacher)
    loss_of = functools.partial(stage_loss, *run, weights=weights, counts=(1.0,) * 4, step=done)
    counts_of = functools.partial(term_rows, image_id=r.model.config.image_token_id)
    in_loss = dict(zip(TERMS, (1.0, *weights) if r.teacher is not None else (1.0, 0, 0, 0, 0)))
    rec = evaluation.evaluate(r.held_out, loss_of, counts_of, in_loss, r.model, a, cuda, done)
    if log is not None:
        log.write(rec)


def stop_at_failed_batch(a, r, master, micro, step):
    """A micro-batch that failed on any process (an image that did not decode, a dead loader
    worker): a checkpoint at the last whole step, then every process's errors, one line each."""
    save(a, r, master, step)
    fix = "replace the file with a readable image, --resume"
    held = f"{os.path.join(a.out, 'checkpoint')} holds step {step}"
    messages = [f"{e}; {held}: {b.get('fix', fix)}" for b in micro for e in b["errors"]]
    processes.run_on_every_process(processes.raise_messages, messages)


def train(a):
    """One stage: the loop, nanoGPT's shape, with the checks and the checkpoints around it."""
    ckpt = os.path.join(a.out, "checkpoint")
    preemption = signals.Preemption(ckpt)  # SIGTERM & co: a checkpoint after the current step
    ddp, cuda, device, rank, world = processes.start(a.cpu)
    master = rank == 0
    r = set_up(a, ddp, cuda, device, rank, world)
    if r is None:  # nothing to train (--plan, or a stage that had finished)
        return dist.destroy_process_group() if ddp else None
    log = checkpoints.Log(a.out, r.step, r.end, a.stage, a.report_to) if master else None
    if master:
        print(
            f"stage {a.stage}: {len(r.ds)} samples, {r.total} steps of {r.global_batch} ({world} "
            f"x {a.batch_size} x {r.accum}), lr {r.table['lr']}, "
            f"{sum(p.numel() for p in r.params) / 1e6:.2f}M trainable, teacher {a.teacher or '-'}"
        )
    batches = micro_batches(a, r, rank, world, cuda)
    for step in log.bar if master else range(r.step, r.end):
        t0 = time.time()
        preemption.step_begins()
        for group in r.opt.param_groups:
            group["lr"] = lr_at(step, r.total, r.table["lr"], r.table["warmup_ratio"])
        micro = data.next_micro_batches(batches, r.accum)
        image_id = r.model.config.image_token_id
        counts, tokens, failed = global_counts(micro, image_id, device, ddp, world)
        if failed:  # an image that did not decode or a dead loader worker, on any process
            stop_at_failed_batch(a, r, master, micro, step)
        # the loss, the five terms, and whether a process was asked to stop
        logged = forward_backward(a, r, micro, counts, ddp, device, step)
        logged[6] = preemption.received is not None
        if ddp:
            dist.all_reduce(logged)
        host = (logged / world).tolist()  # the step's one host sync of the loss
        if not all(map(math.isfinite, host)):  # every process sees the same sums and stops
            raise errors.agreed_error(
                f"stage {a.stage}: loss is {host[0]} at step {step + 1}; stopped without "
                f"saving, the last good checkpoint is in {ckpt}"
            )
        stopping = host[6] > 0 and step + 1 < r.end
        grad_norm, held = optimizer_step(a, r, ddp)
        if master:
            log.write(log_record(r, step, host, grad_norm, tokens, time.time() - t0, device, held))
        if r.held_out and (step + 1 == r.end or (a.eval_every and (step + 1) % a.eval_every == 0)):
            evaluate(a, r, cuda, step + 1, log)  # watched as the step is: it has collectives
        preemption.step_ended(time.time() - t0)
        if step + 1 == r.end or (a.save_every and (step + 1) % a.save_every == 0) or stopping:
            save(a, r, master, step + 1)
        if stopping:
            by = preemption.received or "a signal to another process"
            raise errors.agreed_error(
                f"stopped by {by} at step {step + 1} of {r.end}; {ckpt} holds it: continue with "
                f"the same command and --resume (train.sh: the same command)"
            )
    if master:
        log.close()
        checkpoints.publish(a.out, r.args, r.end, finished=r.end == r.total)
        print(f"stage {a.stage}: done at step {r.end}; model in {a.out}")
    if ddp:
        dist.destroy_process_group()


def main(argv=None):
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    a = flags.parser(__doc__, list(STAGES)).parse_args(argv)
    try:
        plot.plot(a.outs, a.out) if a.cmd == "plot" else train(a)
    except (errors.UserError, OSError) as e:  # the user's to fix (a full disk too): one line
        processes.stop(e, a.out)
    finally:
        processes.cleanup()  # the signal handlers and --out's lock


if __name__ == "__main__":
    main()
