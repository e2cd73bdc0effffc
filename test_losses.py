"""The losses against the paper's equations.

`reference` below is written from the equations alone, in float64, one row and one sample at a time
(it calls nothing of llava_kd). Both forms are checked against it: the spec (logits in:
next_token_loss, distill_loss) and the lean path (hidden states and head weights in: fused_loss), in
value and gradient, then the defining properties.
"""

import pytest
import torch
import torch.nn.functional as F

import llava_kd
from llava_kd import (
    distill_loss,
    fused_loss,
    next_token_loss,
    relation_loss,
    response_loss,
    visual_loss,
)

NAMES = ("L_reg", "L_res", "L_vis", "L_rel", "L_pro")


def reference(s, t, labels, visual, attention):
    """L_reg, L_res, L_vis, L_rel, L_pro of the batch, float64, from the equations: KLD(p_t || p_s)
    = sum_j p_t,j (log p_t,j - log p_s,j) on the shared leading vocabulary; the row at position m-1
    predicts the answer token at m; R = Y Y^T of one sample's visual rows; L_rel = 1 - <R_s, R_t> /
    (|R_s| |R_t|)."""
    s, t = s.double(), t.double()
    v = min(s.shape[-1], t.shape[-1])

    def kld(b, i):
        log_s, log_t = (
            s[b, i, :v] - s[b, i, :v].logsumexp(0),
            t[b, i, :v] - t[b, i, :v].logsumexp(0),
        )
        return (log_t.exp() * (log_t - log_s)).sum()

    ce, res, vis, rel, pro = [], [], [], [], []
    for b in range(s.shape[0]):
        answer_rows = [m - 1 for m in range(1, s.shape[1]) if labels[b, m] != -100]
        for m in answer_rows:
            ce.append(s[b, m].logsumexp(0) - s[b, m, labels[b, m + 1]])  # -log softmax(s)[label]
            res.append(kld(b, m))
        for i in range(s.shape[1]):
            if visual[b, i]:
                vis.append(kld(b, i))
            elif attention[b, i] and i not in answer_rows:
                pro.append(kld(b, i))
        if visual[b].any():
            Y_s, Y_t = s[b, visual[b], :v], t[b, visual[b], :v]
            R_s, R_t = Y_s @ Y_s.T, Y_t @ Y_t.T
            rel.append(1 - (R_s * R_t).sum() / (R_s.norm() * R_t.norm()))

    def mean(xs):
        return torch.stack(xs).sum() / len(xs) if xs else s.sum() * 0

    return [mean(x) for x in (ce, res, vis, rel, pro)]


def batch(B=3, T=20, Vs=50, Vt=50, D_s=8, D_t=12, dtype=torch.float64, seed=0):
    """Hidden states, heads and masks: sample 0 has visual tokens at positions that are not
    consecutive, sample 1 is text-only, sample 2 has a block of visual tokens; answers of different
    lengths; right padding."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, D_s, generator=g).to(dtype).requires_grad_()
    w_s = (torch.randn(Vs, D_s, generator=g) / 2).to(dtype).requires_grad_()
    h_t, w_t = (
        torch.randn(B, T, D_t, generator=g).to(dtype),
        (torch.randn(Vt, D_t, generator=g) / 2).to(dtype),
    )
    visual = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), -100)
    attention = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        pos = [[1, 2, 5, 7, 8], [], [1, 2, 3, 4, 5, 6]][b % 3]
        visual[b, pos] = True
        start, end = 10 + b, T - 2 * b  # prompt, answer, then padding
        labels[b, start:end] = torch.randint(0, min(Vs, Vt), (end - start,), generator=g)
        attention[b, end:] = 0
    return h_s, w_s, h_t, w_t, labels, visual, attention


def weighted(terms, weights):
    return terms[0] + sum(w * x for w, x in zip(weights, terms[1:]))


VOCABS = [(50, 50), (60, 50), (50, 60)]  # equal, student larger, teacher larger
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-3),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Vs,Vt", VOCABS)
@pytest.mark.parametrize("block_rows", [1, 3, None])
@pytest.mark.parametrize("D_s", [8, 16])
def test_fused_loss_equals_the_equations(dtype, Vs, Vt, block_rows, D_s):
    """Values of every term and the gradients of h_s and W_s; blocks of 1 or 3 rows run the
    multi-block path (no m_t given: fused_loss makes M_t). The batch has 11 visual rows, more and
    fewer than the student's width D_s."""
    h_s, w_s, h_t, w_t, labels, visual, attention = batch(Vs=Vs, Vt=Vt, D_s=D_s, dtype=dtype)
    weights = (0.9, 0.7, 0.5, 0.3)  # alpha, beta, gamma, delta: all distinct
    block = {"block": block_rows * Vs} if block_rows else {}
    loss, terms = fused_loss(
        h_s,
        w_s,
        labels,
        visual,
        h_t,
        w_t,
        *weights[:3],
        delta=weights[3],
        attention_mask=attention,
        **block,
    )
    g = torch.autograd.grad(loss, (h_s, w_s))
    # the reference from the same numbers in float64
    h64, w64 = h_s.detach().double().requires_grad_(), w_s.detach().double().requires_grad_()
    ref = reference(h64 @ w64.T, h_t.double() @ w_t.double().T, labels, visual, attention)
    ref_loss = weighted(ref, weights)
    r = torch.autograd.grad(ref_loss, (h64, w64))
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    for k, x in zip(NAMES, ref):
        torch.testing.assert_close(terms[k].double(), x, **tol, msg=k)
    assert g[0].dtype == dtype and g[1].dtype == dtype
    for a, b in zip(g, r):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("Vs,Vt", VOCABS)
def test_spec_equals_the_equations(Vs, Vt):
    h_s, w_s, h_t, w_t, labels, visual, attention = batch(Vs=Vs, Vt=Vt)
    s, t = (h_s @ w_s.T).detach().requires_grad_(), h_t @ w_t.T
    weights = (1.0, 1.0, 0.5, 0.3)
    kd, terms = distill_loss(
        s, t, labels, visual, *weights[:3], delta=weights[3], attention_mask=attention
    )
    loss = next_token_loss(s, labels) + kd
    ref = reference(s, t, labels, visual, attention)
    torch.testing.assert_close(loss, weighted(ref, weights), rtol=1e-9, atol=1e-12)
    for k, x in zip(NAMES[1:], ref[1:]):
        torch.testing.assert_close(terms[k], x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(loss, s)[0],
        torch.autograd.grad(weighted(ref, weights), s)[0],
        rtol=1e-9,
        atol=1e-12,
    )


def test_prompt_term_alone():
    """delta only: the mean KL over rows that are neither answer, visual nor padding (Table A6)."""
    h_s, w_s, h_t, w_t, labels, visual, attention = batch()
    s, t = h_s @ w_s.T, h_t @ w_t.T
    rows = (attention == 1) & ~visual
    rows[:, :-1] &= labels[:, 1:] == -100  # not a row that predicts an answer token
    g = s.detach().double()
    want = F.kl_div(
        g[rows].log_softmax(-1), t[rows].double().log_softmax(-1), log_target=True, reduction="sum"
    )
    want = want / rows.sum()
    spec, _ = distill_loss(s, t, labels, visual, 0.0, 0.0, 0.0, delta=1.0, attention_mask=attention)
    lean, terms = fused_loss(
        h_s, w_s, labels, visual, h_t, w_t, 0.0, 0.0, 0.0, delta=1.0, attention_mask=attention
    )
    torch.testing.assert_close(spec, want)
    torch.testing.assert_close(lean - terms["L_reg"], want)
    assert terms["L_res"] == terms["L_vis"] == terms["L_rel"] == 0  # zero weight: not computed


@pytest.mark.parametrize("teacher", [True, False])
def test_micro_batches_with_counts_add_up_to_one_batch(teacher):
    """Two micro-batches of different answer and visual counts, each divided by the whole batch's
    counts: the sum of their losses and gradients is the one batch's (per-micro-batch means would
    differ)."""
    h_s, w_s, h_t, w_t, labels, visual, attention = batch(B=4)
    kd = (h_t, w_t) if teacher else (None, None)
    whole, _ = fused_loss(h_s, w_s, labels, visual, *kd, delta=0.3, attention_mask=attention)
    want = torch.autograd.grad(whole, (h_s, w_s))
    prompt = llava_kd.prompt_rows(labels, visual, attention)
    counts = [llava_kd.response_rows(labels).sum(), visual.sum(), visual.any(1).sum(), prompt.sum()]
    parts = [
        fused_loss(
            h_s[i],
            w_s,
            labels[i],
            visual[i],
            None if h_t is None or not teacher else h_t[i],
            kd[1],
            delta=0.3,
            attention_mask=attention[i],
            counts=counts,
        )[0]
        for i in (slice(0, 1), slice(1, 4))
    ]
    got = torch.autograd.grad(parts[0] + parts[1], (h_s, w_s))
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and the spec, the same way
    s, t = (h_s @ w_s.T).detach().requires_grad_(), h_t @ w_t.T

    def spec(i, c):
        return distill_loss(
            s[i], t[i], labels[i], visual[i], attention_mask=attention[i], counts=c
        )[0]

    torch.testing.assert_close(
        spec(slice(0, 1), counts) + spec(slice(1, 4), counts), spec(slice(0, 4), (None,) * 4)
    )


def test_teacher_gram_given_or_not():
    """m_t = W_t^T W_t passed in (as the loop does) or not: the same L_rel, on the shared
    vocabulary."""
    h_s, w_s, h_t, w_t, labels, visual, _ = batch(Vs=50, Vt=60)
    m_t = w_t[:50].T @ w_t[:50]
    a = fused_loss(h_s, w_s, labels, visual, h_t, w_t, m_t=m_t)[1]["L_rel"]
    b = fused_loss(h_s, w_s, labels, visual, h_t, w_t)[1]["L_rel"]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_the_teacher_relations_from_vocabulary_chunks_are_those_from_the_head_gram(monkeypatch):
    """R_t = Y_t Y_t^T of each sample: a vocabulary chunk at a time (a wide head, few samples: fewer
    products than W_t^T W_t, which is then not made) or from M_t; both Y_t Y_t^T in float64, with
    chunks that do not divide V. Many samples: the gram, fewer products then. fused_loss's L_rel and
    gradients the same whichever way R_t came."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 40, generator=g, dtype=torch.float64)
    H = [torch.randn(k, 40, generator=g, dtype=torch.float64) for k in (5, 6)]
    want = [(h @ w.T) @ (h @ w.T).T for h in H]
    grams = []
    monkeypatch.setattr(llava_kd, "head_gram", lambda x: grams.append(x) or x.T @ x)
    chunked = llava_kd.teacher_relations(H, w, None, torch.float64, chunk=7)
    given = llava_kd.teacher_relations(H, w, w.T @ w, torch.float64)
    assert not grams
    for a, b, c in zip(chunked, given, want):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-10)
    llava_kd.teacher_relations(H * 10, w, None, torch.float64)
    assert len(grams) == 1
    h_s, w_s, h_t, w_t, labels, visual, _ = batch(D_t=40)
    runs = [fused_loss(h_s, w_s, labels, visual, h_t, w_t, m_t=m) for m in (None, w_t.T @ w_t)]
    assert [x.shape for x in grams[1:]] == [w_s.shape] * 2  # W_s^T W_s alone: R_t from chunks
    torch.testing.assert_close(runs[0][1]["L_rel"], runs[1][1]["L_rel"], rtol=1e-12, atol=1e-14)
    grads = [torch.autograd.grad(loss, (h_s, w_s)) for loss, _ in runs]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_without_teacher_it_is_next_token_loss():
    h_s, w_s, _, _, labels, _, _ = batch()
    loss, terms = fused_loss(h_s, w_s, labels)
    ref = next_token_loss(h_s @ w_s.T, labels)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, (h_s, w_s)), torch.autograd.grad(ref, (h_s, w_s))):
        torch.testing.assert_close(a, b)
    assert list(terms) == ["L_reg"]


def test_frozen_head_gets_no_gradient_and_the_teacher_none():
    h_s, w_s, h_t, w_t, labels, visual, _ = batch()
    w_s.requires_grad_(False)
    w_t.requires_grad_(True)
    loss, _ = fused_loss(h_s, w_s, labels, visual, h_t, w_t)
    loss.backward()
    assert w_s.grad is None and w_t.grad is None and h_s.grad is not None


# Properties of the definition (the spec)
def logits(seed=0, V=50):
    h_s, w_s, h_t, w_t, labels, visual, attention = batch(
        Vs=V, Vt=V, dtype=torch.float32, seed=seed
    )
    return (h_s @ w_s.T).detach().requires_grad_(), (h_t @ w_t.T), labels, visual


def test_identical_logits_give_exactly_zero_and_kl_is_not_symmetric():
    s, t, labels, visual = logits()
    assert response_loss(s, s.detach(), labels).item() == 0.0
    assert visual_loss(s, s.detach(), visual).item() == 0.0
    assert relation_loss(s, s.detach(), visual).item() == pytest.approx(0.0, abs=1e-6)
    assert response_loss(s, t, labels).item() != pytest.approx(
        response_loss(t, s, labels).item(), rel=1e-3
    )


def test_rows_outside_the_mask_do_not_matter_and_get_zero_gradient():
    s, t, labels, visual = logits()
    rows = llava_kd.response_rows(labels)
    for fn, arg, m in (
        (response_loss, labels, rows),
        (visual_loss, visual, visual),
        (relation_loss, visual, visual),
    ):
        s2, t2 = s.detach().clone(), t.clone()
        # scramble the other rows
        s2[~m], t2[~m] = (
            torch.randn_like(s2[~m]) * 5,
            torch.randn_like(t2[~m]) * 5,
        )
        assert fn(s, t, arg).item() == fn(s2, t2, arg).item()
        (g,) = torch.autograd.grad(fn(s, t, arg), s)
        assert (g[~m] == 0).all() and (g[m] != 0).any()


def test_teacher_receives_no_gradient():
    s, t, labels, visual = logits()
    t.requires_grad_(True)
    distill_loss(s, t, labels, visual)[0].backward()
    assert t.grad is None and s.grad is not None


def test_bfloat16_inputs_are_upcast():
    s, t, labels, visual = logits(V=300)
    sb, tb = s.detach().bfloat16().requires_grad_(), t.bfloat16()
    s32 = sb.detach().float().requires_grad_()  # the same numbers, in float32
    for fn, arg in ((response_loss, labels), (visual_loss, visual), (relation_loss, visual)):
        lb, l32 = fn(sb, tb, arg), fn(s32, tb.float(), arg)
        assert lb.dtype == torch.float32
        torch.testing.assert_close(lb, l32, rtol=1e-6, atol=1e-7)
        (gb,), (g32,) = torch.autograd.grad(lb, sb), torch.autograd.grad(l32, s32)
        assert gb.dtype == torch.bfloat16
        # bf16 keeps 8 bits of mantissa
        torch.testing.assert_close(gb.float(), g32, rtol=1e-2, atol=1e-4)


def test_gradcheck_float64():
    h_s, w_s, h_t, w_t, labels, visual, attention = batch(B=2, T=14, Vs=6, Vt=5, D_s=3, D_t=4)
    s, t = (h_s @ w_s.T).detach().requires_grad_(), h_t @ w_t.T

    def spec(x):
        kd = distill_loss(x, t, labels, visual, delta=0.5, attention_mask=attention)[0]
        return kd + next_token_loss(x, labels)

    def lean(h, w):
        return fused_loss(h, w, labels, visual, h_t, w_t, delta=0.5, attention_mask=attention)[0]

    assert torch.autograd.gradcheck(spec, (s,))
    assert torch.autograd.gradcheck(lean, (h_s, w_s))


def test_relation_loss_scale_invariant_and_any_width():
    s, t, _, visual = logits()
    base = relation_loss(s, t, visual).item()
    assert base > 1e-3
    # R scales by c^2: cos does not
    assert relation_loss(s * 3.5, t, visual).item() == pytest.approx(base, rel=1e-5)
    wide = torch.randn(*t.shape[:2], 128) * 2  # e.g. teacher hidden states of another width
    Y = [
        (s[b][visual[b]].double(), wide[b][visual[b]].double())
        for b in range(len(s))
        if visual[b].any()
    ]
    want = sum(
        1 - F.cosine_similarity((a @ a.T).flatten(), (c @ c.T).flatten(), dim=0) for a, c in Y
    ) / len(Y)
    torch.testing.assert_close(relation_loss(s, wide, visual).double(), want, rtol=1e-5, atol=1e-7)


def test_relation_loss_float32_keeps_precision_when_one_minus_cos_is_small():
    # wide rows make R diagonal-heavy and 1 - cos small (~6e-3): float32 sums of the K*K products
    # lose its leading
    # digits (F.cosine_similarity in float32 is off by 1e-4 here, by 3% at the paper's shapes)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 128, 20000, generator=g) * 2, torch.randn(1, 128, 20000, generator=g) * 2
    mask = torch.ones(1, 128, dtype=torch.bool)
    ys, yt = s[0].double(), t[0].double()
    want = 1 - F.cosine_similarity((ys @ ys.T).flatten(), (yt @ yt.T).flatten(), dim=0)
    assert relation_loss(s, t, mask).item() == pytest.approx(want.item(), rel=1e-5)


def test_empty_masks_give_finite_zero_that_backpropagates():
    s, t, _, _ = logits()
    no_labels, no_visual = torch.full(s.shape[:2], -100), torch.zeros(s.shape[:2], dtype=torch.bool)
    for loss in (
        response_loss(s, t, no_labels),
        visual_loss(s, t, no_visual),
        relation_loss(s, t, no_visual),
        distill_loss(s, t, no_labels, no_visual)[0],
    ):
        assert loss.item() == 0.0 and loss.requires_grad
        assert (torch.autograd.grad(loss, s)[0] == 0).all()


def test_zero_weight_drops_a_term():
    s, t, labels, visual = logits()
    loss, terms = distill_loss(s, t, labels, visual, alpha=2.0, beta=0.0, gamma=0.0)
    torch.testing.assert_close(loss, 2 * response_loss(s, t, labels))
    assert terms["L_vis"] == 0 and terms["L_rel"] == 0 and terms["L_res"] > 0


class RecordMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """The input dtypes and shapes of every matrix product that runs under it."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.out_dtypes = []  # mm's and addmm's out_dtype

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2][-2:]
            if func.overloadpacket is torch.ops.aten.addmm:  # (self, mat1, mat2)
                mats = [args[1], args[2]]
            self.calls.append(([m.dtype for m in mats], [tuple(m.shape) for m in mats]))
            self.out_dtypes += [a for a in args if isinstance(a, torch.dtype)]
        return func(*args, **(kwargs or {}))


def test_under_bf16_autocast_the_vocabulary_gemms_run_in_bf16_and_the_values_hold():
    """As the loop runs it on a GPU: float32 hidden states and heads under bf16 autocast. Every
    product with a vocabulary-sized side (logits, dL/dh, dL/dW) runs in bf16; the values and
    gradients still equal the float64 equations within bf16's precision."""
    V = 300
    h_s, w_s, h_t, w_t, labels, visual, attention = batch(Vs=V, Vt=V, dtype=torch.float32)
    with RecordMatmuls() as record, torch.autocast("cpu", dtype=torch.bfloat16):
        m_t = w_t.T @ w_t
        loss, terms = fused_loss(
            h_s,
            w_s,
            labels,
            visual,
            h_t,
            w_t,
            0.9,
            0.7,
            delta=0.3,
            attention_mask=attention,
            m_t=m_t,
        )
        grads = torch.autograd.grad(loss, (h_s, w_s))
    vocab = [dtypes for dtypes, shapes in record.calls if V in {s for sh in shapes for s in sh}]
    by_vocab = [d for d in vocab if d != [torch.float32, torch.float32]]  # M = W^T W: float32
    assert len(by_vocab) >= 4 and all(d == [torch.bfloat16] * 2 for d in by_vocab)
    h64, w64 = h_s.detach().double().requires_grad_(), w_s.detach().double().requires_grad_()
    ref = reference(h64 @ w64.T, h_t.double() @ w_t.double().T, labels, visual, attention)
    ref_loss = weighted(ref, (0.9, 0.7, 0.5, 0.3))
    tol = dict(rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    for k, x in zip(NAMES, ref):
        torch.testing.assert_close(terms[k].double(), x, **tol, msg=k)
    assert grads[0].dtype == grads[1].dtype == torch.float32
    for a, b in zip(grads, torch.autograd.grad(ref_loss, (h64, w64))):
        torch.testing.assert_close(a.double(), b, **tol)


def test_cudas_path_runs_on_shapes_alone_with_the_masks_on_the_cpu():
    """The loop's call on a GPU: the hidden states and heads on the meta device (it takes CUDA's
    code path, and any read of their values by the host raises: a host sync would), the masks on
    the CPU. Every vocabulary-sized product is a bf16 GEMM that writes float32; the gradients come
    back in each input's shape and dtype."""
    _, _, _, _, labels, visual, attention = batch(Vs=300, Vt=300)
    B, T = labels.shape
    meta = dict(device="meta")
    h_s = torch.empty(B, T, 8, dtype=torch.bfloat16, **meta).requires_grad_()
    w_s = torch.empty(300, 8, **meta).requires_grad_()
    h_t = torch.empty(B, T, 12, dtype=torch.bfloat16, **meta)
    w_t = torch.empty(300, 12, dtype=torch.bfloat16, **meta)
    m_s, m_t = torch.empty(8, 8, **meta), torch.empty(12, 12, **meta)
    with RecordMatmuls() as record:
        args = (h_s, w_s, labels, visual, h_t, w_t, 0.9, 0.7)
        loss, terms = fused_loss(*args, delta=0.3, attention_mask=attention, m_s=m_s, m_t=m_t)
        loss.backward()
    # the GEMMs with a head (the KL's row dot products, bmm, are float32 sums of probabilities)
    vocab = [d for d, shapes in record.calls if len(shapes[0]) == 2 and 300 in sum(shapes, ())]
    assert len(vocab) >= 4 and all(d == [torch.bfloat16] * 2 for d in vocab)
    assert record.out_dtypes and set(record.out_dtypes) == {torch.float32}
    assert h_s.grad.shape == h_s.shape and h_s.grad.dtype == torch.bfloat16
    assert w_s.grad.shape == w_s.shape and w_s.grad.dtype == torch.float32
    assert loss.device.type == "meta" and set(terms) == set(NAMES)
