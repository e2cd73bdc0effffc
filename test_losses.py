"""The executable spec of the paper's losses: L_res, L_vis (MDist), L_rel (RDist) and their sum.

Each test is one property of the definition, checked against a plain reference built from
F.kl_div / F.cosine_similarity on the selected rows.
"""
import pytest
import torch
import torch.nn.functional as F

import llava_kd
from llava_kd import distill_loss, relation_loss, response_loss, visual_loss


def kl_ref(s_rows, t_rows):
    """mean over rows of KL(p_t || p_s), the reference: sum over the vocabulary, mean over rows."""
    if len(s_rows) == 0:
        return s_rows.sum() * 0
    ls, lt = F.log_softmax(s_rows.double(), -1), F.log_softmax(t_rows.double(), -1)
    return F.kl_div(ls, lt, log_target=True, reduction="sum") / len(s_rows)


def rel_ref(s, t, mask):
    losses = []
    for b in range(s.shape[0]):
        if mask[b].any():
            ys, yt = s[b][mask[b]].double(), t[b][mask[b]].double()
            losses.append(1 - F.cosine_similarity((ys @ ys.T).flatten(), (yt @ yt.T).flatten(), dim=0))
    return torch.stack(losses).mean() if losses else torch.zeros((), dtype=torch.float64)


def make(B=3, T=20, V=50, Vt=None, dtype=torch.float32, seed=0, n_vis=(5, 0, 7), grad=True):
    """Logits, labels and a visual mask for a batch whose samples have different numbers of visual
    tokens (including none) and of response tokens, with right padding."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g) * 2).to(dtype).requires_grad_(grad)
    t = (torch.randn(B, T, Vt or V, generator=g) * 2).to(dtype)
    labels = torch.full((B, T), -100)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        k = n_vis[b % len(n_vis)]
        mask[b, 1:1 + k] = True
        start, end = 1 + k + 2, T - 2 * b  # prompt after the image, then the answer, then padding
        labels[b, start:end] = torch.randint(0, V, (max(end - start, 0),), generator=g)
    return s, t, labels, mask


def response_rows(labels):
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = labels[:, 1:] != -100
    return rows


SHAPES = [dict(B=1, T=12, V=30, n_vis=(4,)), dict(B=3, T=20, V=50), dict(B=4, T=9, V=7, n_vis=(0, 3, 1, 5)),
          dict(B=2, T=40, V=300, n_vis=(16, 9))]


@pytest.mark.parametrize("shape", SHAPES)
def test_response_loss_equals_kl_div_reference(shape):
    s, t, labels, _ = make(**shape)
    rows = response_rows(labels)
    ref = kl_ref(s[rows], t[rows])
    torch.testing.assert_close(response_loss(s, t, labels).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_visual_loss_equals_kl_div_reference(shape):
    s, t, _, mask = make(**shape)
    ref = kl_ref(s[mask], t[mask])
    torch.testing.assert_close(visual_loss(s, t, mask).double(), ref, rtol=1e-5, atol=1e-6)


def test_response_rows_are_the_ones_that_predict_labels():
    # one response token at position 5: only row 4 of the logits predicts it
    s, t, _, mask = make(B=1, T=8, V=11)
    labels = torch.full((1, 8), -100)
    labels[0, 5] = 3
    torch.testing.assert_close(response_loss(s, t, labels).double(), kl_ref(s[0, 4:5], t[0, 4:5]))


@pytest.mark.parametrize("shape", SHAPES)
def test_kl_gradient_equals_autograd_of_reference(shape):
    s, t, labels, mask = make(**shape)
    for loss, rows in ((response_loss(s, t, labels), response_rows(labels)), (visual_loss(s, t, mask), mask)):
        (g,) = torch.autograd.grad(loss, s)
        (g_ref,) = torch.autograd.grad(kl_ref(s[rows], t[rows]), s)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_identical_logits_give_exactly_zero_and_swapping_changes_value():
    s, t, labels, mask = make()
    assert response_loss(s, s.detach(), labels).item() == 0.0
    assert visual_loss(s, s.detach(), mask).item() == 0.0
    # KL is not symmetric: KL(p_t || p_s) != KL(p_s || p_t)
    assert response_loss(s, t, labels).item() != pytest.approx(response_loss(t, s, labels).item(), rel=1e-3)
    assert visual_loss(s, t, mask).item() != pytest.approx(visual_loss(t, s, mask).item(), rel=1e-3)


def test_rows_outside_the_mask_do_not_matter_and_get_zero_gradient():
    s, t, labels, mask = make()
    for fn, arg, rows in ((response_loss, labels, response_rows(labels)), (visual_loss, mask, mask)):
        s2, t2 = s.detach().clone(), t.clone()
        s2[~rows] = torch.randn_like(s2[~rows]) * 5  # scramble every unselected row of both sides
        t2[~rows] = torch.randn_like(t2[~rows]) * 5
        assert fn(s, t, arg).item() == fn(s2, t2, arg).item()
        (g,) = torch.autograd.grad(fn(s, t, arg), s)
        assert (g[~rows] == 0).all() and (g[rows] != 0).any()
    (g,) = torch.autograd.grad(relation_loss(s, t, mask), s)
    assert (g[~mask] == 0).all() and (g[mask] != 0).any()


def test_teacher_receives_no_gradient():
    s, t, labels, mask = make()
    t.requires_grad_(True)
    loss, _ = distill_loss(s, t, labels, mask)
    loss.backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("Vs,Vt", [(60, 50), (50, 60)])
def test_vocabulary_mismatch_equals_slicing_by_hand(Vs, Vt):
    s, t, labels, mask = make(V=Vs, Vt=Vt)
    v = min(Vs, Vt)
    s_cut = s.detach()[..., :v].clone().requires_grad_()
    for fn, arg in ((response_loss, labels), (visual_loss, mask)):
        (g,) = torch.autograd.grad(fn(s, t, arg), s)
        (g_cut,) = torch.autograd.grad(fn(s_cut, t[..., :v], arg), s_cut)
        assert fn(s, t, arg).item() == fn(s_cut, t[..., :v], arg).item()
        torch.testing.assert_close(g[..., :v], g_cut)
        assert (g[..., v:] == 0).all()
    loss, terms = distill_loss(s, t, labels, mask)
    loss_cut, terms_cut = distill_loss(s_cut, t[..., :v], labels, mask)
    torch.testing.assert_close(loss, loss_cut)
    assert terms["L_rel"].item() == pytest.approx(terms_cut["L_rel"].item(), rel=1e-6)


def test_bfloat16_agrees_with_float32():
    s, t, labels, mask = make(V=300, T=40, n_vis=(16, 9, 0))
    sb, tb = s.detach().bfloat16().requires_grad_(), t.bfloat16()
    s32, t32 = sb.detach().float().requires_grad_(), tb.float()  # the same numbers, in float32
    for fn, arg in ((response_loss, labels), (visual_loss, mask), (relation_loss, mask)):
        lb, l32 = fn(sb, tb, arg), fn(s32, t32, arg)
        assert lb.dtype == torch.float32  # the math ran in float32
        # bf16 inputs are upcast exactly, so only the order of float32 sums differs
        torch.testing.assert_close(lb, l32, rtol=1e-5, atol=1e-6)
        (gb,) = torch.autograd.grad(lb, sb)
        (g32,) = torch.autograd.grad(l32, s32)
        assert gb.dtype == torch.bfloat16
        torch.testing.assert_close(gb.float(), g32, rtol=1e-2, atol=1e-4)  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("fn", [response_loss, visual_loss, relation_loss])
def test_gradcheck_float64(fn):
    s, t, labels, mask = make(B=2, T=7, V=5, dtype=torch.float64, n_vis=(3, 0))
    arg = labels if fn is response_loss else mask
    assert torch.autograd.gradcheck(lambda x: fn(x, t, arg), (s,))


def test_gradcheck_float64_distill_loss_with_vocabulary_mismatch():
    s, t, labels, mask = make(B=2, T=7, V=6, Vt=5, dtype=torch.float64, n_vis=(3, 2))
    assert torch.autograd.gradcheck(lambda x: distill_loss(x, t, labels, mask)[0], (s,))


def test_blocked_computation_equals_one_block(monkeypatch):
    s, t, labels, mask = make(B=2, T=40, V=300, n_vis=(16, 9))
    def run():
        loss, _ = distill_loss(s, t, labels, mask)
        return (loss, *torch.autograd.grad(loss, s))
    whole = run()
    monkeypatch.setattr(llava_kd, "CHUNK", 700)  # blocks of 2 rows / 43 columns: many partial blocks
    blocked = run()
    for a, b in zip(whole, blocked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_relation_loss_equals_cosine_reference(shape):
    s, t, _, mask = make(**shape)
    torch.testing.assert_close(relation_loss(s, t, mask).double(), rel_ref(s, t, mask), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(relation_loss(s, t, mask), s)
    (g_ref,) = torch.autograd.grad(rel_ref(s, t, mask), s)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-8)


def test_relation_loss_zero_for_identical_and_scale_invariant():
    s, t, _, mask = make()
    assert relation_loss(s, s.detach(), mask).item() == pytest.approx(0.0, abs=1e-6)
    base = relation_loss(s, t, mask).item()
    assert base > 1e-3
    # R = Y Y^T scales by c^2 and the cosine does not see positive scale
    assert relation_loss(s * 3.5, t, mask).item() == pytest.approx(base, rel=1e-5)
    assert relation_loss(s, t * 0.25, mask).item() == pytest.approx(base, rel=1e-5)


def test_relation_loss_averages_over_samples_with_visual_tokens():
    s, t, _, mask = make(B=3, n_vis=(5, 0, 7))  # the middle sample is text-only
    per_sample = [relation_loss(s[b:b + 1], t[b:b + 1], mask[b:b + 1]) for b in (0, 2)]
    torch.testing.assert_close(relation_loss(s, t, mask), (per_sample[0] + per_sample[1]) / 2)


def test_relation_loss_with_different_widths():
    s, _, _, mask = make(V=50)
    t = torch.randn(s.shape[0], s.shape[1], 128) * 2  # e.g. teacher hidden states of another width
    torch.testing.assert_close(relation_loss(s, t, mask).double(), rel_ref(s, t, mask), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(relation_loss(s, t, mask), s)
    assert g.shape == s.shape and torch.isfinite(g).all()


def test_empty_masks_give_finite_zero_that_backpropagates():
    s, t, _, _ = make()
    no_labels = torch.full(s.shape[:2], -100)
    no_visual = torch.zeros(s.shape[:2], dtype=torch.bool)
    losses = [response_loss(s, t, no_labels), visual_loss(s, t, no_visual), relation_loss(s, t, no_visual),
              distill_loss(s, t, no_labels, no_visual)[0]]
    for loss in losses:
        assert loss.item() == 0.0 and loss.requires_grad
        (g,) = torch.autograd.grad(loss, s)
        assert (g == 0).all()


def test_distill_loss_is_the_weighted_sum_and_zero_weight_drops_a_term():
    s, t, labels, mask = make()
    loss, terms = distill_loss(s, t, labels, mask)  # paper weights 1, 1, 0.5
    expected = response_loss(s, t, labels) + visual_loss(s, t, mask) + 0.5 * relation_loss(s, t, mask)
    torch.testing.assert_close(loss, expected)
    assert set(terms) == {"L_res", "L_vis", "L_rel"} and all(v > 0 for v in terms.values())
    loss, terms = distill_loss(s, t, labels, mask, alpha=2.0, beta=0.0, gamma=0.0)
    torch.testing.assert_close(loss, 2 * response_loss(s, t, labels))
    assert terms["L_vis"] == 0 and terms["L_rel"] == 0


def test_relation_loss_float32_keeps_precision_when_one_minus_cos_is_small():
    # wide rows make R diagonal-heavy and 1 - cos small (~6e-3): a float32 cosine of the flattened R loses
    # its leading digits (F.cosine_similarity in float32 is off by 1e-4 here, by 3% at the paper's shapes)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 128, 20000, generator=g) * 2, torch.randn(1, 128, 20000, generator=g) * 2
    mask = torch.ones(1, 128, dtype=torch.bool)
    ref = rel_ref(s, t, mask)
    assert relation_loss(s, t, mask).item() == pytest.approx(ref.item(), rel=1e-5)


def test_the_terms_share_one_gradient_buffer_and_each_adds_exactly_its_part():
    """L_res, L_vis and L_rel write into one buffer: the sum of their gradients, whatever else reads the
    logits (a plain op beside them), whichever terms are backpropagated, over repeated backward passes."""
    s, t, labels, mask = make(dtype=torch.float64)
    rows = response_rows(labels)
    refs = {"res": lambda x: kl_ref(x[rows], t[rows]), "vis": lambda x: kl_ref(x[mask], t[mask]),
            "rel": lambda x: rel_ref(x, t, mask), "plain": lambda x: (x ** 2).mean()}
    ours = {"res": lambda x: response_loss(x, t, labels), "vis": lambda x: visual_loss(x, t, mask),
            "rel": lambda x: relation_loss(x, t, mask), "plain": lambda x: (x ** 2).mean()}
    for terms in (["res", "vis", "rel"], ["res", "plain", "vis"], ["vis", "rel"], ["plain", "rel", "res"]):
        want = torch.autograd.grad(sum(refs[k](s) for k in terms), s)[0]
        s.grad = None
        logged = ours["vis"](s).detach()  # computed, not backpropagated: adds nothing
        sum(ours[k](s) for k in terms).backward()
        torch.testing.assert_close(s.grad, want, rtol=1e-9, atol=1e-12)
    s.grad = None
    loss = response_loss(s, t, labels) + relation_loss(s, t, mask)
    loss.backward(retain_graph=True)
    loss.backward()  # a second pass accumulates, as for any op
    want = torch.autograd.grad(refs["res"](s) + refs["rel"](s), s)[0]
    torch.testing.assert_close(s.grad, 2 * want, rtol=1e-9, atol=1e-12)
    assert logged >= 0


def test_shared_buffer_on_logits_that_come_from_a_layer():
    s, t, labels, mask = make(dtype=torch.float64, grad=False)
    h = torch.randn(*s.shape[:2], 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, s.shape[-1], dtype=torch.float64)
    rows = response_rows(labels)
    (response_loss(h @ w, t, labels) + visual_loss(h @ w, t, mask) + relation_loss(h @ w, t, mask)).backward()
    x = h @ w
    want = torch.autograd.grad(kl_ref(x[rows], t[rows]) + kl_ref(x[mask], t[mask]) + rel_ref(x, t, mask), h)[0]
    torch.testing.assert_close(h.grad, want, rtol=1e-9, atol=1e-12)
    h.grad = None
    x = h @ w  # one logits tensor read by all three, as in the training loop
    (response_loss(x, t, labels) + visual_loss(x, t, mask) + relation_loss(x, t, mask)).backward()
    torch.testing.assert_close(h.grad, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("Vs,Vt,dtype", [(50, 50, torch.float64), (50, 64, torch.float64), (64, 50, torch.float32),
                                         (50, 50, torch.bfloat16)])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 0.5), (0.0, 1.0, 0.0), (1.0, 0.0, 1.0)])
def test_fused_loss_from_hidden_states_equals_the_logits_spec(Vs, Vt, dtype, weights, monkeypatch):
    """fused_loss(h_s, W_s, ..., h_t, W_t) = next_token_loss + distill_loss on h W^T: values and the
    gradients of h_s and W_s; text-only rows, samples without visual tokens, mismatched vocabularies."""
    monkeypatch.setattr(llava_kd, "CHUNK", 97)  # many blocks of rows and of columns
    _, _, labels, mask = make(V=min(Vs, Vt), n_vis=(5, 0, 7))
    g = torch.Generator().manual_seed(1)
    h_s = torch.randn(3, 20, 8, generator=g).to(dtype).requires_grad_()
    w_s = (torch.randn(Vs, 8, generator=g) / 2).to(dtype).requires_grad_()
    h_t, w_t = torch.randn(3, 20, 12, generator=g).to(dtype), (torch.randn(Vt, 12, generator=g) / 2).to(dtype)
    loss, terms = llava_kd.fused_loss(h_s, w_s, labels, mask, h_t, w_t, *weights)
    gh, gw = torch.autograd.grad(loss, (h_s, w_s))
    s, t = (h_s.double() @ w_s.double().T), (h_t.double() @ w_t.double().T)
    ref_terms = llava_kd.distill_loss(s, t, labels, mask, *weights)[1]
    ref = llava_kd.next_token_loss(s, labels) + llava_kd.distill_loss(s, t, labels, mask, *weights)[0]
    rh, rw = torch.autograd.grad(ref, (h_s, w_s))
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.double(), ref, **tol)
    for k, v in ref_terms.items():
        torch.testing.assert_close(terms[k].double(), v.double(), **tol)
    torch.testing.assert_close(gh.double(), rh.double(), **tol)
    torch.testing.assert_close(gw.double(), rw.double(), **tol)


def test_fused_loss_without_teacher_is_next_token_loss():
    _, _, labels, _ = make(V=40)
    h, w = torch.randn(3, 20, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    loss, terms = llava_kd.fused_loss(h, w, labels)
    ref = llava_kd.next_token_loss(h @ w.T, labels)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, b)
    assert list(terms) == ["L_reg"]
