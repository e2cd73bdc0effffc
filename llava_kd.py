"""LLaVA-KD (ICCV 2025, arXiv 2410.16236), minimal and exact.

The three distillation losses of the paper, each one function with the equation above it:
    L_res  response_loss   KL(teacher || student) on the rows that predict response tokens  (MDist)
    L_vis  visual_loss     the same KL on the visual-token rows                             (MDist)
    L_rel  relation_loss   1 - cos between the visual tokens' self-correlation matrices     (RDist)
and distill_loss, which combines them as L_DPT / L_DFT = L_reg + alpha L_res + beta L_vis + gamma L_rel.
"""
import torch

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
