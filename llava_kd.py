"""LLaVA-KD (ICCV 2025, arXiv 2410.16236), minimal and exact.

    python llava_kd.py train --stage dpt --data JSON --images DIR --vision DIR --llm DIR --teacher DIR --out DIR
    torchrun --standalone --nproc_per_node=8 llava_kd.py train --stage dft ... --init DIR --teacher DIR [--fsdp]
    torchrun --nnodes=2 --node_rank=R --master_addr=ADDR --master_port=29500 --nproc_per_node=8 llava_kd.py train ...
    bash train.sh                                              # the whole recipe: toy with no settings (README)

Each stage writes OUT/ (model.safetensors, config.json, the processor: stock from_pretrained loads it), OUT/log.jsonl
(every loss term, lr, grad_norm, tokens/s, peak and trained-state memory per step) and OUT/checkpoint/ (for --resume).
Sections, top to bottom: the losses (paper Sec. 3: MDist = L_res + L_vis, RDist = L_rel, and their sum
L_DPT / L_DFT), the model wrapper and the stage table (Table A9), the training loop. The toy lives in toy.py.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import resource
import shutil
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import data

# ------------------------------------------------------------------------------------------------
# Losses (paper Sec. 3), plain tensors in: copy this section as it is. logits [B, T, V]; labels [B, T], -100 except on
# answer tokens; visual_mask [B, T] bool, True at image tokens. Math in float32 at least; KL on the shared vocabulary.
# Sums are divided once, by their count or by the one given (num_rows, num_samples, counts: over a global batch).

def response_rows(labels):  # [B, T] bool: the rows of logits that predict an answer token (row m-1 predicts m)
    return F.pad(labels[:, 1:], (0, 1), value=-100) != -100


def prompt_rows(labels, visual_mask, attention_mask):  # Table A6's prompt tokens: neither answer, visual nor padding
    return attention_mask.bool() & ~response_rows(labels) & ~visual_mask


# KLD(phi_l, phi_s) = sum_{j=1}^{V} phi_l(Y_j) log( phi_l(Y_j) / phi_s(Y_j) ), averaged over the rows where rows is True
def mean_kl(student_logits, teacher_logits, rows, num_rows=None):
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_s = student_logits[rows][:, :v].to(dt).log_softmax(-1)
    log_p_t = teacher_logits[rows][:, :v].detach().to(dt).log_softmax(-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") / (num_rows or rows.sum().clamp_min(1))


# L_res = (1/M) sum_{m=1}^{M} KLD(phi_l(y_m | y_<m), phi_s(y_m | y_<m)), M answer tokens (a mean: alpha is batch-free)
def response_loss(student_logits, teacher_logits, labels, num_rows=None):
    return mean_kl(student_logits, teacher_logits, response_rows(labels), num_rows)


# L_vis = (1/K) sum_{k=1}^{K} sum_{j=1}^{V} phi_l(Y_j | y_<k) log(phi_l(Y_j | y_<k) / phi_s(Y_j | y_<k)), K image tokens
def visual_loss(student_logits, teacher_logits, visual_mask, num_rows=None):
    return mean_kl(student_logits, teacher_logits, visual_mask, num_rows)


# L_rel = 1 - Cos(R_v^s, R_v^t) = 1 - (R_v^s . R_v^t) / (||R_v^s|| ||R_v^t||), for one sample
def relation_distance(R_s, R_t):  # float64 sums: 1 - cos is small (~5e-3) and float32 sums lose its leading digits
    st, ss, tt = (torch.sum(x.double() * y.double()) for x, y in ((R_s, R_t), (R_s, R_s), (R_t, R_t)))
    return 1 - st / (ss * tt).sqrt().clamp_min(1e-16)


# R_v = y_v (x) y_v = Y Y^T (K x K), Y a sample's visual rows (logits or any features); mean over samples with an image
def relation_loss(student_feats, teacher_feats, visual_mask, num_samples=None):
    dt = torch.promote_types(student_feats.dtype, torch.float32)
    total = student_feats[..., :0].sum().to(dt)  # 0, in the graph: a batch without images still backpropagates
    for b in visual_mask.any(1).nonzero().flatten().tolist():
        Y_s, Y_t = student_feats[b][visual_mask[b]].to(dt), teacher_feats[b][visual_mask[b]].detach().to(dt)
        total = total + relation_distance(Y_s @ Y_s.T, Y_t @ Y_t.T).to(dt)
    return total / (num_samples or visual_mask.any(1).sum().clamp_min(1))


# L_reg = -(1/M) sum_{m=1}^{M} log phi_s(y_m | y_<m): the student's own next-token loss (the only loss of pt and sft)
def next_token_loss(student_logits, labels, num_rows=None):
    rows = response_rows(labels)
    logits = student_logits[rows].to(torch.promote_types(student_logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels[:, 1:][rows[:, :-1]], reduction="sum") / (num_rows or rows.sum().clamp_min(1))


# L_DPT = L_DFT = L_reg + alpha L_res + beta L_vis + gamma L_rel (1, 1, 0.5) [+ delta L_pro: Table A6's prompt tokens]
#   but L_reg, and each term (0 if its weight is). counts: answer rows, visual rows, samples with an image, prompt rows
def distill_loss(student_logits, teacher_logits, labels, visual_mask, alpha=1.0, beta=1.0, gamma=0.5, *,
                 delta=0.0, attention_mask=None, counts=(None,) * 4):
    s, t, v = student_logits, teacher_logits, min(student_logits.shape[-1], teacher_logits.shape[-1])
    pad = torch.ones_like(visual_mask) if attention_mask is None else attention_mask
    zero = s.new_zeros((), dtype=torch.float32)
    terms = {"L_res": response_loss(s, t, labels, counts[0]) if alpha else zero,
             "L_vis": visual_loss(s, t, visual_mask, counts[1]) if beta else zero,
             "L_rel": relation_loss(s[..., :v], t[..., :v], visual_mask, counts[2]) if gamma else zero,
             "L_pro": mean_kl(s, t, prompt_rows(labels, visual_mask, pad), counts[3]) if delta else zero}
    loss = sum(w * x for w, x in zip((alpha, beta, gamma, delta), terms.values()))
    return loss, {k: x.detach() for k, x in terms.items()}


# The lean path, from each model's last hidden states h [B, T, D] and head W [V, D], never [B, T, V]: L_reg and KL in
# blocks of rows; L_rel by R = Y Y^T = h M h^T = P h^T, M = W^T W: P = Y W from the blocks, or h M if K > D (or m_t given).
BLOCK = 2 ** 26


def fused_loss(h_s, w_s, labels, visual_mask=None, h_t=None, w_t=None, alpha=1.0, beta=1.0, gamma=0.5, *,
               delta=0.0, attention_mask=None, m_t=None, counts=(None,) * 4):
    """(loss, terms) as next_token_loss + distill_loss on (h_s W_s^T, h_t W_t^T); without a teacher, L_reg alone."""
    reg, vis = response_rows(labels), torch.zeros_like(labels, dtype=torch.bool) if visual_mask is None else visual_mask
    pro = prompt_rows(labels, vis, torch.ones_like(vis) if attention_mask is None else attention_mask)
    n = [float(c) if c is not None else max(int(m.sum()), 1) for c, m in zip(counts, (reg, vis, vis.any(1), pro))]
    kd = [m & (h_t is not None and w != 0) for m, w in ((reg, alpha), (vis, beta), (vis, gamma), (pro, delta))]
    with torch.autocast(h_s.device.type, enabled=False):  # the dtypes are chosen inside
        loss, terms = _Fused.apply(h_s, w_s, h_t, w_t, m_t, labels, [reg] + kd, n, (alpha, beta, gamma, delta))
    return loss, dict(zip(("L_reg", "L_res", "L_vis", "L_rel", "L_pro") if h_t is not None else ("L_reg",), terms))


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, m_t, labels, rows, n, weights):
        (reg, res, vis, rel, pro), (alpha, beta, gamma, delta) = rows, weights
        h_s, w_s, T, dt = h_s.detach(), w_s.detach(), h_s.shape[1], torch.promote_types(h_s.dtype, torch.float32)
        V_s, V_t, wt_h = len(w_s), 0 if h_t is None else len(w_t), None if h_t is None else w_t.to(h_t.dtype)
        v, w_h, w32 = min(V_s, V_t or V_s), w_s.to(h_s.dtype), w_s.to(dt)  # logits in h's dtype, as the model's head
        g_h, g_w = h_s.new_zeros(h_s.shape, dtype=dt), torch.zeros_like(w_s, dtype=dt) if ctx.needs_input_grad[1] else None
        sums = torch.zeros(5, dtype=torch.float64, device=h_s.device)  # L_reg, L_res, L_vis, L_rel, L_pro, not averaged
        kinds, target = [m.flatten().to(dt) for m in (res, vis, pro)], F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
        w_reg, w_kl = reg.flatten().to(dt) / n[0], alpha * kinds[0] / n[0] + beta * kinds[1] / n[1] + delta * kinds[2] / n[3]
        in_rel, h_s2, h_t2 = rel.flatten(), h_s.flatten(0, 1), h_s.flatten(0, 1)[:, :0] if h_t is None else h_t.flatten(0, 1)
        at, K_all = in_rel.cumsum(0) - 1, int(in_rel.sum())  # each L_rel row's row of P; K visual rows in all
        m_s = w32[:v].T @ w32[:v] if K_all > h_s.shape[-1] else None  # V D^2 flops, less than P = Y W's K V D if K > D
        ws_p, wt_p = w32[:v] if m_s is None else None, w_t[:v].to(dt) if K_all and m_t is None else None
        P_s = g_h.new_zeros(K_all, h_s.shape[-1]) if m_s is None else h_s2[in_rel].to(dt) @ m_s
        P_t = g_h.new_zeros(K_all, h_t2.shape[-1]) if m_t is None else h_t2[in_rel].to(dt) @ m_t.to(dt)
        step = max(1, BLOCK // (V_s + v))  # rows a block; its [rows, V] tensors are made once (new ones cost page faults)
        work = [g_h.new_empty(step * k) for k in (max(V_s, V_t), V_s, v if V_t else 0, v if v < V_s else 0)]
        def logits(h, w, out, P, at, w_p):  # out = h W^T; P[at] = out W_p for its first len(at) rows (if w_p is given)
            torch.mm(h, w.T, out=out) if h.dtype == out.dtype else out.copy_(h @ w.T)
            if w_p is not None and len(at):
                P[at] = out[:len(at), :len(w_p)] @ w_p
            return out
        rows = torch.cat([in_rel.nonzero(), (~in_rel & ((w_reg != 0) | (w_kl != 0))).nonzero()]).flatten()
        for idx in rows.tensor_split(-(-len(rows) // step) or 1):  # equal blocks of rows, L_rel's first: CE, KL, gradients
            hs, r, at_, out = h_s2[idx], idx[:, None], at[idx[in_rel[idx]]], lambda i, k: work[i][:len(idx) * k].view(-1, k)
            log_p = torch.log_softmax(logits(hs, w_h, out(0, V_s), P_s, at_, ws_p), -1, out=out(1, V_s))
            nll, kl = F.nll_loss(log_p, target[idx], reduction="none"), torch.zeros_like(idx, dtype=dt)
            if h_t is not None:  # KL(p_t || p_s) = sum_j p_t (log p_t - log p_s) on the shared vocabulary, as mean_kl
                log_q = log_p if v == V_s else torch.log_softmax(log_p[:, :v], -1, out=out(3, v))
                log_p_t = torch.log_softmax(logits(h_t2[idx], wt_h, out(0, V_t), P_t, at_, wt_p)[:, :v], -1, out=out(2, v))
                p_t = torch.exp(log_p_t, out=out(0, v))
                kl = log_p_t.sub_(log_q).mul_(p_t).sum(-1)
            g_s = log_p.exp_()  # the textbook gradients: d CE / ds = p_s - onehot(target), d KL(p_t || p_s) / ds = p_s - p_t
            g_kl = p_t.sub_(g_s if log_q is log_p else log_q.exp_()).mul_(-w_kl[r]) if h_t is not None else 0
            g_s.mul_(w_reg[r]).scatter_add_(1, target[r].clamp_min(0), -w_reg[r])[:, :v] += g_kl
            g_h[idx // T, idx % T] = g_s @ w32
            if g_w is not None:
                g_w.addmm_(g_s.T, hs.to(dt))
            sums[[0, 1, 2, 4]] += torch.stack([nll.sum()] + [(kl * k[idx]).sum() for k in kinds]).double()
        samples, K = rel.any(1).nonzero().flatten().tolist(), rel.sum(1).tolist()
        if samples:  # R = P H^T for each sample with an image; autograd gives G = dL/dR_s ([K, K] tensors only)
            H_s, P_s, P_t = [h_s[b][rel[b]].to(dt) for b in samples], P_s.split(K), P_t.split(K)
            with torch.enable_grad():
                R_s = [(P_s[b] @ H.T).requires_grad_() for b, H in zip(samples, H_s)]
                dist = sum(relation_distance(R, P_t[b] @ h_t[b][rel[b]].to(dt).T) for b, R in zip(samples, R_s))
                G = torch.autograd.grad(gamma / n[2] * dist.to(dt), R_s)
            sums[3] += dist.detach()  # R = H M H^T:  dL/dH = (G + G^T) H M = (G + G^T) P,  dL/dM = H^T G H
            g_h.flatten(0, 1)[in_rel] += torch.cat([(g + g.T) @ P_s[b] for b, g in zip(samples, G)])
            if g_w is not None:  # M = W^T W:  dL/dW = W (dL/dM + dL/dM^T)
                g_w[:v].addmm_(w32[:v], sum(H.T @ (g + g.T) @ H for H, g in zip(H_s, G)))
        terms = (sums / sums.new_tensor([n[0], n[0], n[1], n[2], n[3]])).to(dt)
        ctx.save_for_backward(g_h.to(h_s.dtype), None if g_w is None else g_w.to(w_s.dtype))  # dL/dh, dL/dW: made here
        ctx.mark_non_differentiable(terms)
        return terms[0] + alpha * terms[1] + beta * terms[2] + gamma * terms[3] + delta * terms[4], terms

    @staticmethod
    def backward(ctx, g, _):
        return *(x if x is None or g == 1 else x * g for x in ctx.saved_tensors), *[None] * 7


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


def _tower_from_llava(path, cfg):
    """The vision tower of a LLaVA checkpoint, reading only its tensors (a 7B teacher's LLM stays on disk)."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else ["model.safetensors"]
    tower = transformers.AutoModel.from_config(cfg.vision_config)
    state = {}
    for name in files:  # saved as "vision_tower.*" (transformers' older names, still written) or "model.vision_tower.*"
        with safe_open(os.path.join(path, name), "pt") as f:
            for k in f.keys():
                for prefix in ("vision_tower.", "model.vision_tower."):
                    if k.startswith(prefix):
                        state[k[len(prefix):]] = f.get_tensor(k)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}: the vision tower's weights did not load: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return tower


def load_vision(path):
    """A SigLIP (or CLIP) checkpoint directory, or the vision tower of a LLaVA one -> (tower, image processor,
    vision_feature_layer, vision_feature_select_strategy, extra tokens such as CLS)."""
    cfg = transformers.AutoConfig.from_pretrained(path)
    if cfg.model_type == "llava":
        proc = transformers.AutoProcessor.from_pretrained(path)
        return (_tower_from_llava(path, cfg), proc.image_processor, cfg.vision_feature_layer,
                cfg.vision_feature_select_strategy, proc.num_additional_image_tokens)
    cls = {"siglip": transformers.SiglipVisionModel, "siglip_vision_model": transformers.SiglipVisionModel,
           "clip": transformers.CLIPVisionModel, "clip_vision_model": transformers.CLIPVisionModel}.get(cfg.model_type)
    if cls is None:
        raise data.UserError(f"--vision {path}: a SigLIP, CLIP or LLaVA checkpoint is needed, not {cfg.model_type}")
    tower = _checked(cls.from_pretrained(path, output_loading_info=True), path)
    clip = cls is transformers.CLIPVisionModel  # CLIP has a CLS token, which LLaVA-1.5 drops ("default")
    # SigLIP has no CLS: "full" keeps all 27 x 27 = 729 patch tokens at 384px (the public code drops one)
    return tower, transformers.AutoImageProcessor.from_pretrained(path), -2, ("default" if clip else "full"), int(clip)


# Chat templates. Clients pass a turn's content as a string ("<image>\nWhat is it?": lmms-eval's llava_hf) or
# typed ([{"type": "image"}, {"type": "text", "text": ...}]: transformers' pipeline, VLMEvalKit); LLM tokenizers'
# templates take only strings, llava-hf's only typed content. Every template saved here takes both: one of
# these preludes rewrites the messages into the form the template underneath reads.
TYPED_AS_STRING = (  # image parts first, "<image>\n" each, then the text parts: LLaVA's own layout
    "{%- set ns = namespace(m=[]) -%}{%- for m in messages -%}{%- if m['content'] is string -%}"
    "{%- set ns.m = ns.m + [m] -%}{%- else -%}{%- set c = namespace(s='') -%}"
    "{%- for p in m['content'] if p['type'] == 'image' -%}{%- set c.s = c.s + '<image>\\n' -%}{%- endfor -%}"
    "{%- for p in m['content'] if p['type'] == 'text' -%}{%- set c.s = c.s + p['text'] -%}{%- endfor -%}"
    "{%- set ns.m = ns.m + [{'role': m['role'], 'content': c.s}] -%}{%- endif -%}{%- endfor -%}"
    "{%- set messages = ns.m -%}")
STRING_AS_TYPED = (
    "{%- set ns = namespace(m=[]) -%}{%- for m in messages -%}{%- if m['content'] is string -%}"
    "{%- set c = namespace(p=[]) -%}{%- for i in range(m['content'].count('<image>')) -%}"
    "{%- set c.p = c.p + [{'type': 'image'}] -%}{%- endfor -%}{%- set c.p = c.p + [{'type': 'text', "
    "'text': m['content'].replace('<image>\\n', '').replace('<image>', '')}] -%}"
    "{%- set ns.m = ns.m + [{'role': m['role'], 'content': c.p}] -%}{%- else -%}{%- set ns.m = ns.m + [m] -%}"
    "{%- endif -%}{%- endfor -%}{%- set messages = ns.m -%}")
PROBE = {"string": [{"role": "user", "content": "<image>\nQUESTION"}, {"role": "assistant", "content": "ANSWER"}],
         "typed": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "QUESTION"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "ANSWER"}]}]}


def render(tok, template, messages, generation_prompt=False):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=generation_prompt)


def chat_template_both_forms(tok, template, where):
    """template, or template behind the prelude that makes it render string and typed content alike."""
    def renders(t, form):
        try:
            text = render(tok, t, PROBE[form])
        except Exception:  # a template written for the other form may fail on this one
            return None
        return text if "<image>" in text and "ANSWER" in text else None
    for t in (template, TYPED_AS_STRING + template, STRING_AS_TYPED + template):
        if renders(t, "string") is not None and renders(t, "string") == renders(t, "typed"):
            return t
    raise data.UserError(f"{where}: its chat template renders neither string nor typed content as a LLaVA prompt "
                     f"(<image>, then the question); give it one that does")


def prepare_chat(processor, generation_config, where, end_is_eos=False):
    """One chat template on processor and tokenizer alike, taking both content forms; the token that ends an
    assistant turn in it (<|im_end|> in ChatML) becomes the generation config's first eos id and, for the chat
    stages (end_is_eos), the tokenizer's eos: a client that stops on tokenizer.eos_token_id (lmms-eval) then stops
    where training ended every answer. Qwen's chat models ship so (eos <|im_end|>); a base LLM's tokenizer says
    <|endoftext|>, which ChatML never emits after an answer. pt/dpt keep it: captions end on <|endoftext|>."""
    tok = processor.tokenizer
    template = processor.chat_template or tok.chat_template
    if template is None:  # allowed for pt/dpt; LlavaDataset stops sft/dft on it
        return
    processor.chat_template = tok.chat_template = template = chat_template_both_forms(tok, template, where)
    text = render(tok, template, PROBE["string"])
    after = tok(text[text.rindex("ANSWER") + len("ANSWER"):], add_special_tokens=False)["input_ids"][:1]
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    if not (after and after[0] in special):
        if end_is_eos:
            raise data.UserError(f"{where}: its chat template ends an assistant turn without a special token, so no "
                             f"generation could stop there; use a template that ends turns with one (eos, <|im_end|>)")
        return
    if end_is_eos:
        tok.eos_token = tok.convert_ids_to_tokens(after[0])
    old = generation_config.eos_token_id
    old = [] if old is None else [old] if isinstance(old, int) else list(old)
    generation_config.eos_token_id = after + [i for i in old if i != after[0]]
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tok.pad_token_id


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
    if tok.pad_token is None:  # Llama's has none; padding is known by the attention mask, the id never matters
        tok.pad_token = tok.unk_token or tok.eos_token
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
    prepare_chat(processor, model.generation_config, llm_path)
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if meta:
        raise RuntimeError(f"student built from {vision_path} + {llm_path}: these were not loaded: {meta[:5]}")
    return model, processor


def load_llava(path, dtype=None):
    """Any LLaVA checkpoint directory in HF format (a teacher, or a previous stage's output)."""
    model = _checked(transformers.LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype, output_loading_info=True), path)
    processor = transformers.AutoProcessor.from_pretrained(path)
    prepare_chat(processor, model.generation_config, path)
    return model, processor


def check_compatible(teacher, t_proc, student, s_proc):
    """Distillation compares the two models token by token: same token ids, same image token, same
    number of visual tokens per image. Stops with a clear message otherwise."""
    vs, vt = s_proc.tokenizer.get_vocab(), t_proc.tokenizer.get_vocab()
    small, big = sorted((vs, vt), key=len)
    differ = [k for k, i in small.items() if big.get(k) != i]
    problems = []
    if differ:
        name = lambda p: f"{p.tokenizer.name_or_path} ({type(p.tokenizer).__name__}, {len(p.tokenizer)} tokens)"
        problems.append(f"the tokenizers disagree on {len(differ)} tokens (e.g. {differ[:3]}): teacher tokenizer "
                        f"{name(t_proc)}, student tokenizer {name(s_proc)}; use a student LLM of the teacher's "
                        f"family, with the same tokenizer")
    if teacher.config.image_token_id != student.config.image_token_id:
        problems.append(f"image token ids differ: teacher {teacher.config.image_token_id}, "
                        f"student {student.config.image_token_id}")
    nt, ns = data.image_seq_length(t_proc), data.image_seq_length(s_proc)
    if nt != ns:
        problems.append(f"visual tokens per image differ: teacher {nt}, student {ns} (use the teacher's vision "
                        f"tower for the student: --vision TEACHER_DIR)")
    if problems:
        raise data.UserError("teacher and student cannot be distilled:\n  " + "\n  ".join(problems))


def load_teacher(path, student, s_proc, dtype=None, new_student=False):
    """The teacher: frozen, in eval mode, never updated; checked against the student, whose vision tower
    becomes the teacher's (one copy in memory: the paper shares the visual encoder). Both models read the same
    token ids, so the student's chat format is the one the teacher sees: a new student takes the teacher's."""
    teacher, t_proc = load_llava(path, dtype)
    teacher.eval().requires_grad_(False)
    check_compatible(teacher, t_proc, student, s_proc)
    if new_student and t_proc.chat_template:
        s_proc.chat_template = s_proc.tokenizer.chat_template = t_proc.chat_template
        prepare_chat(s_proc, student.generation_config, path)
    s, t = (render(p.tokenizer, p.chat_template, PROBE["string"]) if p.chat_template else "(no chat template)"
            for p in (s_proc, t_proc))
    if s != t:
        i = next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t)))
        print(f"note: the student's and the teacher's ({path}) chat templates render a conversation differently "
              f"from character {i}: student {s[i:i + 60]!r}, teacher {t[i:i + 60]!r}. The teacher reads the "
              f"student's format in dft: it distils best when the student uses the teacher's template.")
    student.model.vision_tower = teacher.model.vision_tower
    return teacher


def vision_features(model, pixel_values):
    """Z_v: the frozen vision tower's selected hidden states, before the projector. Teacher and student
    share the tower, so this is computed once per batch and handed to both projectors."""
    c = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[c.vision_feature_layer]
    return hidden[:, 1:] if c.vision_feature_select_strategy == "default" else hidden


def llava_hidden(model, input_ids, attention_mask, z_v):
    """LLaVA's forward from Z_v up to the LLM's last hidden states [B, T, D]: H_v = projector(Z_v) is written on
    the image-token positions of the text embeddings, then the LLM runs. The head (logits = h W^T) is left to
    the loss, which applies it block by block."""
    embeds = model.get_input_embeddings()(input_ids)
    if z_v is not None:
        mask = input_ids == model.config.image_token_id
        h_v = model.model.multi_modal_projector(z_v)
        if int(mask.sum()) != h_v.shape[0] * h_v.shape[1]:
            raise ValueError(f"{int(mask.sum())} image tokens in the batch for {h_v.shape[0]} x {h_v.shape[1]} "
                             f"visual features")
        embeds = embeds.masked_scatter(mask[..., None], h_v.to(embeds.dtype))
    return model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state


def llava_logits(model, input_ids, attention_mask, z_v):
    """The logits [B, T, V] of the same forward (the tests compare them with the stock model's)."""
    return model.lm_head(llava_hidden(model, input_ids, attention_mask, z_v))


def save_checkpoint_files(model, processor, out, state_dict=None):
    model.save_pretrained(out, state_dict=state_dict)  # safetensors; state_dict: FSDP's gathered full one
    processor.save_pretrained(out)


# ------------------------------------------------------------------------------------------------
# Training: one plain loop for all four stages (nanoGPT-style), single process or torchrun + DDP.
class _Student(torch.nn.Module):
    """What DDP wraps: the student from Z_v (computed once, shared with the teacher) to its loss, so that every
    parameter the loss reaches (the head too: fused_loss applies it) is in DDP's forward."""

    def __init__(self, llava):
        super().__init__()
        self.llava = llava

    def forward(self, input_ids, attention_mask, z_v, labels, h_t=None, w_t=None, m_t=None,
                weights=(1.0, 1.0, 0.5, 0.0), counts=(None,) * 4):
        h_s = llava_hidden(self.llava, input_ids, attention_mask, z_v)
        visual_mask = input_ids == self.llava.config.image_token_id
        return fused_loss(h_s, self.llava.lm_head.weight, labels, visual_mask, h_t, w_t, *weights[:3], delta=weights[3],
                          attention_mask=attention_mask, m_t=m_t, counts=counts)


def teacher_gram(teacher, model):
    """M_t = W_t^T W_t over the vocabulary the two heads share: fixed for the run, so L_rel's teacher side costs
    [K, D] x [D, D] products a step instead of the vocabulary."""
    v = min(teacher.lm_head.weight.shape[0], model.lm_head.weight.shape[0])
    w = teacher.lm_head.weight[:v].float()
    return w.T @ w


TERMS = ("L_reg", "L_res", "L_vis", "L_rel", "L_pro")


def stage_loss(student, model, teacher, b, weights=(1.0, 1.0, 0.5, 0.0), counts=(None,) * 4, m_t=None):
    """One micro-batch's loss: L_reg in pt/sft; L_DPT = L_DFT = L_reg + alpha L_res + beta L_vis + gamma L_rel
    (+ delta L_pro) with a teacher (dpt/dft). student runs the student (_Student, or DDP around it); model is its
    LLaVA. The teacher gives its last hidden states and head weight only: fused_loss uses them block by block."""
    with torch.no_grad():  # the frozen, shared vision tower: Z_v once for both models
        z_v = vision_features(model, b["pixel_values"]) if b["pixel_values"] is not None else None
        h_t = llava_hidden(teacher, b["input_ids"], b["attention_mask"], z_v) if teacher is not None else None
    w_t = teacher.lm_head.weight if teacher is not None else None
    loss, terms = student(b["input_ids"], b["attention_mask"], z_v, b["labels"], h_t, w_t, m_t, weights, counts)
    return loss, {k: v.detach() for k, v in terms.items()}


def shard(student, model, cuda):
    """FSDP2 instead of DDP: parameters, gradients and AdamW state split over the processes. Each decoder layer is a
    group; the root group (embeddings, final norm, head, projector) is whole through the root's forward, where
    fused_loss reads the head (tied to the embeddings or not). The frozen vision tower, shared with the teacher and run
    before the student, stays whole on every process; so does the teacher (frozen: no gradients or optimizer state)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if cuda else MixedPrecisionPolicy()
    for layer in model.model.language_model.layers:
        fully_shard(layer, mp_policy=mp)
    return fully_shard(student, mp_policy=mp, ignored_params=set(model.model.vision_tower.parameters()))


def full_state(student, opt):
    """FSDP: the whole model's and optimizer's state dicts, gathered (every process takes part; rank 0 saves them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {k[len("llava."):]: v for k, v in get_model_state_dict(student, options=full).items()}
    return weights, get_optimizer_state_dict(student, opt, options=full)


def trained_bytes(params, opt):
    """This process's bytes of trained parameters, their gradients and AdamW state (its shards under FSDP)."""
    tensors = [*params, *(p.grad for p in params if p.grad is not None), *(x for s in opt.state.values() for x in s.values())]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP: DTensors, this process's shard
    return sum(t.numel() * t.element_size() for t in local)


def lr_at(step, total, peak, warmup_ratio=0.03):
    """Linear warmup over the first 3% of the steps, then cosine decay to 0 (Table A9)."""
    warmup = max(1, math.ceil(total * warmup_ratio))
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save_checkpoint(model, processor, state, out, state_dict=None):
    """out/checkpoint/: model + processor (stock from_pretrained loads it) + train_state.pt for --resume.
    Written beside it and renamed into place, so a crash while saving leaves the previous one whole."""
    final, tmp, old = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint_files(model, processor, tmp, state_dict)
    torch.save(state, os.path.join(tmp, "train_state.pt"))
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# What each path flag must hold: checked from its config.json before anything heavy is loaded.
CHECKPOINT_FLAGS = {
    "init": ({"llava"}, "a LLaVA checkpoint directory (a previous stage's --out, or an HF LLaVA)"),
    "teacher": ({"llava"}, "a LLaVA checkpoint directory"),
    "vision": ({"siglip", "siglip_vision_model", "clip", "clip_vision_model", "llava"},
               "a SigLIP or CLIP checkpoint directory, or a LLaVA one (its vision tower is used)"),
    "llm": (None, "a causal-LM checkpoint directory, e.g. Qwen1.5-0.5B"),
}


def check_checkpoint(flag, path, kinds, what):
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise data.UserError(f"--{flag} {path}: " + ("no config.json in this directory" if os.path.isdir(path)
                                                      else "no such directory") + f"; expected {what}")
    kind = json.load(open(config)).get("model_type")
    if (kind not in kinds) if kinds else kind in (None, "llava"):
        raise data.UserError(f"--{flag} {path}: a {kind!r} checkpoint; expected {what}")


def read_train_state(path):
    """The step, counts, AdamW state and flags of a checkpoint, as tensors and plain values only: a pickled object
    in a file someone shared could run code here, so weights_only refuses it."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:
        raise data.UserError(f"--resume: {path} holds more than tensors and plain values, so it is not loaded "
                             f"({type(e).__name__}); resume only from checkpoints this program wrote") from None


def check_flags(a, world):
    """Every user error that flags alone can show, before any weights or data are read."""
    stage = STAGES[a.stage]
    if not os.path.isfile(a.data):
        raise data.UserError(f"--data {a.data}: no such file; expected a LLaVA JSON file")
    if not os.path.isdir(a.images):
        raise data.UserError(f"--images {a.images}: no such directory; expected the folder the JSON's image paths "
                             f"are relative to")
    for flag, (kinds, what) in CHECKPOINT_FLAGS.items():
        if getattr(a, flag):
            check_checkpoint(flag, getattr(a, flag), kinds, what)
    global_batch = a.global_batch_size or stage["global_batch"]
    if global_batch % (a.batch_size * world):
        raise data.UserError(f"--global_batch_size {global_batch} must be a multiple of --batch_size {a.batch_size} "
                             f"x {world} processes")
    if stage["teacher"] != bool(a.teacher):
        raise data.UserError(f"--stage {a.stage} " + ("needs --teacher DIR" if stage["teacher"] else "takes no --teacher"))
    if a.resume and not os.path.isfile(os.path.join(a.out, "checkpoint", "train_state.pt")):
        raise data.UserError(f"--resume: no checkpoint in {os.path.join(a.out, 'checkpoint')} to continue from")
    if a.fsdp and "RANK" not in os.environ:
        raise data.UserError("--fsdp shards the student over processes: start it with torchrun (train.sh: FSDP=1)")
    if not (a.resume or a.init or (a.vision and a.llm)):
        raise data.UserError("give --init DIR (a previous stage's output) or --vision DIR --llm DIR (a new student)")
    return global_batch


def train(a):
    stage = STAGES[a.stage]
    # flags, paths and every sample are checked first: a typo costs seconds, not a teacher's loading time
    global_batch = check_flags(a, int(os.environ.get("WORLD_SIZE", 1)))
    samples = data.read_samples(a.data, a.images)
    if len(samples) < global_batch:
        raise data.UserError(f"{a.data}: {len(samples)} samples are fewer than one global batch ({global_batch}); "
                             f"lower --global_batch_size")
    state = read_train_state(os.path.join(a.out, "checkpoint", "train_state.pt")) if a.resume else None
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
    accum = global_batch // (a.batch_size * world)  # micro-steps per optimizer step on each process
    ckpt = os.path.join(a.out, "checkpoint")

    torch.manual_seed(a.seed)  # the same new projector on every process
    model, processor = load_llava(ckpt if a.resume else a.init) if (a.resume or a.init) else build_student(a.vision, a.llm)
    teacher = None
    if stage["teacher"]:
        teacher = load_teacher(a.teacher, model, processor, torch.bfloat16 if cuda else None,
                               new_student=not (a.resume or a.init)).to(device)
        model.model.vision_tower.float()  # the shared tower stays in the student's dtype, as it is saved with it
    prepare_chat(processor, model.generation_config, ckpt if a.resume else a.init or a.llm, end_is_eos=stage["chat"])
    apply_stage(model, a.stage)
    model.to(device)
    model.config.use_cache = False
    if a.grad_checkpointing:
        # transformers >= 5.x renames gradient_checkpointing_enable (kept as a deprecated alias)
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if a.fsdp:
        student = shard(_Student(model), model, cuda)
    elif ddp:  # text-only micro-batches leave the projector unused: DDP must then look for unused parameters
        student = DDP(_Student(model), device_ids=[device.index] if cuda else None, find_unused_parameters=stage["chat"],
                      gradient_as_bucket_view=True)  # the gradients live in DDP's buckets: no second copy
    else:
        student = _Student(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    ds = data.LlavaDataset(a.data, a.images, processor, chat=stage["chat"], max_length=a.max_length, samples=samples)
    steps_per_epoch = len(ds) // global_batch
    total = steps_per_epoch * a.epochs
    end = min(total, a.max_steps or total)  # --max_steps stops early; the schedule stays that of `total`
    step = 0
    if a.resume:
        if (state["total"], state["global_batch"], state["seed"]) != (total, global_batch, a.seed):
            raise data.UserError(f"--resume: {ckpt} was written with another data size, --global_batch_size or --seed")
        if a.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(student, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state["optimizer"])
        step = state["step"]
    image_id, pad_id = model.config.image_token_id, processor.tokenizer.pad_token_id
    weights = (a.alpha, a.beta, a.gamma, a.delta)
    m_t = teacher_gram(teacher, model) if teacher is not None and a.gamma else None
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
        path = os.path.join(a.out, "log.jsonl")
        kept = [line for line in open(path) if json.loads(line)["step"] <= step] if a.resume and os.path.exists(path) else []
        log = open(path, "w")  # a resumed run drops what a crash logged after its checkpoint
        log.writelines(kept)
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
        count = torch.tensor([[int(m.sum()) for m in (response_rows(b["labels"]), vis, vis.any(1), b["attention_mask"],
                                                      prompt_rows(b["labels"], vis, b["attention_mask"]))]
                              for b in micro for vis in [b["input_ids"] == image_id]], dtype=torch.float64).sum(0).to(device)
        if ddp:
            dist.all_reduce(count)
        # answer rows, visual rows, samples with an image, prompt rows; / world: DDP averages over processes
        counts = [max(float(count[i]), 1.0) / world for i in (0, 1, 2, 4)]
        logged = torch.zeros(6, dtype=torch.float64, device=device)  # loss, L_reg, L_res, L_vis, L_rel, L_pro
        for i, b in enumerate(micro):
            b = {k: v.to(device) if v is not None else None for k, v in b.items()}
            # only the last micro-step all-reduces the gradients; the others accumulate locally
            last = i == accum - 1
            if a.fsdp:
                student.set_requires_gradient_sync(last)
            sync = student.no_sync() if ddp and not a.fsdp and not last else contextlib.nullcontext()
            with sync, autocast:
                loss, terms = stage_loss(student, model, teacher, b, weights, counts, m_t)
            loss.backward()
            logged += torch.stack([loss.detach()] + [terms.get(k, torch.zeros(())).to(device) for k in TERMS]).double()
        if ddp:
            dist.all_reduce(logged)
        logged /= world
        if not torch.isfinite(logged).all():  # every process sees the same numbers and stops together
            raise data.UserError(f"stage {a.stage}: loss is {logged[0].item()} at step {step + 1}; stopped without "
                             f"saving, the last good checkpoint is in {ckpt}")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # the norm before clipping, logged
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        opt.step()
        held = trained_bytes(params, opt)
        opt.zero_grad(set_to_none=True)
        save = step + 1 == end or (a.save_every and (step + 1) % a.save_every == 0)
        if save:  # under FSDP every process takes part in gathering the full state
            full_weights, opt_state = full_state(student, opt) if a.fsdp else (None, opt.state_dict())
        if master:
            rec = dict(zip(("loss",) + TERMS, logged.tolist()))
            peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            rec.update(step=step + 1, lr=opt.param_groups[0]["lr"], grad_norm=grad_norm.item(), seconds=time.time() - t0,
                       tokens_per_s=count[3].item() / (time.time() - t0), peak_gib=peak / 2 ** 30,
                       trained_gib=held / 2 ** 30)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k not in ("step", "lr")})
            if save:
                state = dict(step=step + 1, total=total, global_batch=global_batch, seed=a.seed, optimizer=opt_state,
                             args=vars(a))
                save_checkpoint(model, processor, state, a.out, full_weights)
        if ddp and save:
            dist.barrier()  # nobody runs ahead of a checkpoint being written
    if master:
        for name in os.listdir(ckpt):  # the stage's output: the model, loadable from --out itself
            if name != "train_state.pt":
                shutil.copy(os.path.join(ckpt, name), os.path.join(a.out, name))
        print(f"stage {a.stage}: done at step {end}; model in {a.out}")
    if ddp:
        dist.destroy_process_group()


def main(argv=None):
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="one stage: pt, dpt, sft or dft", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="One stage of the recipe (Table A9's lr and global batch by default). One process: "
                       "python llava_kd.py train ...; one node: torchrun --standalone --nproc_per_node=N llava_kd.py "
                       "train ...; several nodes: torchrun --nnodes, --node_rank, --master_addr on each.\nOutputs: --out "
                       "holds the model and processor, log.jsonl and checkpoint/ (--resume continues from it).")
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
    p.add_argument("--delta", type=float, default=0.0, help="weight of the KL on the prompt tokens (Table A6; 0: off)")
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
    p.add_argument("--fsdp", action="store_true", help="shard the student over the processes (FSDP2) instead of DDP: "
                   "for students whose weights, gradients and AdamW state do not fit one GPU")
    a = ap.parse_args(argv)
    try:
        train(a)
    except data.UserError as e:  # the user's to fix: the message alone, once (every rank stops on it), exit 1
        rank = os.environ.get("RANK", "0")
        if rank != "0":  # rank 0 says it: torchrun stops every rank as soon as one exits, so this one waits for
            time.sleep(60)  # rank 0 to say it and be killed; it speaks only if rank 0 did not fail (another node)
            raise SystemExit(f"error (rank {rank}): {e}") from None
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
