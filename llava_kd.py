"""LLaVA-KD (ICCV 2025, arXiv 2410.16236), minimal and exact.

The three distillation losses of the paper, each one function with the equation above it:
    L_res  response_loss   KL(teacher || student) on the rows that predict response tokens  (MDist)
    L_vis  visual_loss     the same KL on the visual-token rows                             (MDist)
    L_rel  relation_loss   1 - cos between the visual tokens' self-correlation matrices     (RDist)
and distill_loss, which combines them as L_DPT / L_DFT = L_reg + alpha L_res + beta L_vis + gamma L_rel.
"""
import argparse
import os

import torch
import transformers

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


def _mean_row_kl(student_logits, teacher_logits, row_mask):
    """(1 / N) sum over the N rows where row_mask is True of KL(p_t || p_s); a finite 0 when N = 0."""
    rows = row_mask.reshape(-1).nonzero().squeeze(1)
    return _RowKL.apply(student_logits, teacher_logits.detach(), rows) / max(rows.numel(), 1)


# L_res = (1/M) sum_{m=1}^{M} KLD( phi_l(y_m | y_<m), phi_s(y_m | y_<m) )
#   phi_l, phi_s: the teacher's and the student's next-token distributions; m runs over the M response
#   tokens of the batch. The distribution for token m is read at position m-1: logits[:, :-1] predict
#   labels[:, 1:]. Summed over the batch, divided once by M (paper: a sum; the mean keeps alpha scale-free).
def response_loss(student_logits, teacher_logits, labels):
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = labels[:, 1:] != -100
    return _mean_row_kl(student_logits, teacher_logits, rows)


# L_vis = (1/K) sum_{k=1}^{K} sum_{j=1}^{V} phi_l(Y_j | y_<k) log( phi_l(Y_j | y_<k) / phi_s(Y_j | y_<k) )
#   k runs over the K visual tokens of the batch (visual_mask), j over the V vocabulary entries.
def visual_loss(student_logits, teacher_logits, visual_mask):
    return _mean_row_kl(student_logits, teacher_logits, visual_mask)


def _gram(x, idx, dt):
    """R = Y Y^T for Y = x[idx] ([K, D]), accumulated over blocks of columns: Y itself is never built."""
    R = x.new_zeros(len(idx), len(idx), dtype=dt)
    for c in range(0, x.shape[-1], max(1, CHUNK // max(len(idx), 1))):
        y = x[idx, c:c + CHUNK // len(idx)].to(dt)
        R.addmm_(y, y.T)
    return R


class _Relation(torch.autograd.Function):
    """sum over samples b with visual tokens of 1 - cos(vec R_s,b, vec R_t,b), R = Y Y^T of the visual rows.

    backward: with G = d(1 - cos)/dR_s,  dL/dY_s = (G + G^T) Y_s, again block by block over the columns.
    """

    @staticmethod
    def forward(ctx, s, t, visual_mask):
        dt = _math_dtype(s, t)
        total, G = torch.zeros((), dtype=dt, device=s.device), []
        for b, k in enumerate(visual_mask.sum(1).tolist()):
            if k == 0:  # text-only sample: no visual tokens, no relation
                G.append(None)
                continue
            idx = visual_mask[b].nonzero().squeeze(1)
            R_s, R_t = _gram(s[b], idx, dt), _gram(t[b], idx, dt)
            # the three K*K-term sums in float64: 1 - cos is small, and fp32 sums lose its leading digits
            ss, tt, st = (torch.sum(a * b, dtype=torch.float64) for a, b in ((R_s, R_s), (R_t, R_t), (R_s, R_t)))
            norm = (ss * tt).sqrt().clamp_min(1e-16)  # |R_s| |R_t|, clamped as F.cosine_similarity does
            cos = st / norm
            total += (1 - cos).to(dt)
            G.append(-(R_t / norm - cos * R_s / ss.clamp_min(1e-16)).to(dt))  # d(1 - cos) / dR_s
        ctx.save_for_backward(s, visual_mask)
        ctx.G = G
        return total

    @staticmethod
    def backward(ctx, g):
        s, visual_mask = ctx.saved_tensors
        grad = torch.zeros_like(s)
        for b, G in enumerate(ctx.G):
            if G is None:
                continue
            idx, G = visual_mask[b].nonzero().squeeze(1), (G + G.T) * g
            w = max(1, CHUNK // len(idx))
            for c in range(0, s.shape[-1], w):
                grad[b, idx, c:c + w] = (G @ s[b, idx, c:c + w].to(G.dtype)).to(grad.dtype)
        return grad, None, None


# L_rel = 1 - Cos(R_v^s, R_v^t) = 1 - (R_v^s . R_v^t) / (||R_v^s|| ||R_v^t||),   R_v = y_v (x) y_v = Y Y^T
#   Y: one sample's K visual rows of the features (logits or hidden states; each side keeps its own width,
#   R is K x K either way). Averaged over the samples of the batch that have visual tokens.
def relation_loss(student_feats, teacher_feats, visual_mask):
    n = int(visual_mask.any(1).sum())
    return _Relation.apply(student_feats, teacher_feats.detach(), visual_mask) / max(n, 1)


# L_DPT = L_DFT = L_reg + alpha L_res + beta L_vis + gamma L_rel   (paper: alpha, beta, gamma = 1, 1, 0.5)
# This returns the distillation part, alpha L_res + beta L_vis + gamma L_rel, and each term for logging;
# L_reg, the student's own next-token loss, is added by the training loop. A zero weight skips its term.
def distill_loss(student_logits, teacher_logits, labels, visual_mask, alpha=1.0, beta=1.0, gamma=0.5):
    zero = student_logits.new_zeros((), dtype=torch.float32)
    L_res = response_loss(student_logits, teacher_logits, labels) if alpha else zero
    L_vis = visual_loss(student_logits, teacher_logits, visual_mask) if beta else zero
    L_rel = zero
    if gamma:
        v = min(student_logits.shape[-1], teacher_logits.shape[-1])  # L_rel on the shared vocabulary
        s = student_logits if student_logits.shape[-1] == v else student_logits[..., :v]
        L_rel = relation_loss(s, teacher_logits[..., :v], visual_mask)
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
    "teacher_llm": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, pad=64),
    "student_llm": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, pad=16),
}


def make_toy(out, seed=0, **data_sizes):
    texts = data.make_toy_data(os.path.join(out, "data"), seed, **data_sizes)
    tok = toy_tokenizer(texts)
    torch.manual_seed(seed)
    vcfg = transformers.SiglipVisionConfig(image_size=32, patch_size=4, hidden_size=64, intermediate_size=128,
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("toy", help="write tiny checkpoints and a toy data set, offline")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "toy":
        make_toy(a.out, a.seed)


if __name__ == "__main__":
    main()
