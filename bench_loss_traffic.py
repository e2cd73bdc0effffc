"""The lean loss's GPU cost by arithmetic: every aten op's bytes and FLOPs at the paper's shapes.

    python bench_loss_traffic.py [--visual 729] [--answer 150] [--block N] [--gpu h100]

Runs `fused_loss`'s forward and backward once on this CPU under bf16 autocast, as the loop calls it
on a GPU under DDP (one sample: --visual visual + --answer answer rows and a short prompt; V =
151936; the student's float32 hidden states and head, 1024 wide; the bf16 teacher's, 2560 wide; the
loop's W_t^T W_t given), and counts each aten op's bytes (its tensor inputs and outputs; views are
free) and FLOPs (matrix products: 2 m n k). Prints them a loss row (the rows the blocks take), and
the time a GPU would take by a roofline: each op the larger of FLOPs / peak and bytes / bandwidth,
summed. A change to the loss is judged by these figures, not by this CPU's clock.
"""

import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llava_kd

# dense peak FLOP/s by the product's dtype, and memory bandwidth (bytes/s), from the vendors' sheets
GPUS = {
    "h100": dict(bf16=989e12, fp32=67e12, bandwidth=2.9e12),  # the H100 figures
    "h200": dict(bf16=989e12, fp32=67e12, bandwidth=4.8e12),
}
PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "addmm_"}


def product_flops(name, args, out):
    """2 m n k of a matrix product (batched: times the batch)."""
    a, b = (args[1], args[2]) if name.startswith(("addmm", "baddbmm")) else (args[0], args[1])
    return 2 * out.numel() * a.shape[-1]


class Traffic(TorchDispatchMode):
    """Each aten op's bytes and FLOPs, summed by op name, and its roofline time on a GPU."""

    def __init__(self, gpu):
        super().__init__()
        self.gpu = gpu
        self.ops = collections.defaultdict(lambda: [0, 0, 0, 0.0])  # calls, bytes, FLOPs, seconds

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        name = func.overloadpacket.__name__
        tensors = [x for x in [*args, *(kwargs or {}).values()] if torch.is_tensor(x)]
        outs = [x for x in (out if isinstance(out, (list, tuple)) else [out]) if torch.is_tensor(x)]
        moved = sum(x.numel() * x.element_size() for x in tensors + outs)
        flops = product_flops(name, args, outs[0]) if name in PRODUCTS else 0
        dtype = "bf16" if outs and outs[0].dtype == torch.bfloat16 else "fp32"
        seconds = max(flops / self.gpu[dtype], moved / self.gpu["bandwidth"])
        row = self.ops[name]
        row[0] += 1
        row[1] += moved
        row[2] += flops
        row[3] += seconds
        return out


def sample(visual, answer, prompt=20, V=151936, D_s=1024, D_t=2560, seed=0):
    """One sample's hidden states, heads and masks, as the loop hands them to fused_loss."""
    g = torch.Generator().manual_seed(seed)
    T = 1 + visual + prompt + answer
    h_s = (torch.randn(1, T, D_s, generator=g) * 0.5).requires_grad_()
    w_s = (torch.randn(V, D_s, generator=g) * 0.02).requires_grad_()
    h_t = (torch.randn(1, T, D_t, generator=g) * 0.5).bfloat16()
    w_t = (torch.randn(V, D_t, generator=g) * 0.02).bfloat16()
    visual_mask = torch.zeros(1, T, dtype=torch.bool)
    visual_mask[0, 1 : 1 + visual] = True
    labels = torch.full((1, T), -100)
    labels[0, T - answer :] = torch.randint(0, V, (answer,), generator=g)
    m_t = w_t.float().T @ w_t.float()
    return h_s, w_s, h_t, w_t, labels, visual_mask, m_t


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--visual", type=int, default=729)
    ap.add_argument("--answer", type=int, default=150)
    ap.add_argument(
        "--block", type=int, default=2**26, help="fused_loss's block, logits (the loop's on CUDA)"
    )
    ap.add_argument("--gpu", choices=GPUS, default="h100")
    a = ap.parse_args()
    h_s, w_s, h_t, w_t, labels, visual_mask, m_t = sample(a.visual, a.answer)
    rows = int((llava_kd.response_rows(labels) | visual_mask).sum())
    traffic = Traffic(GPUS[a.gpu])
    t0 = time.time()
    with traffic, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = llava_kd.fused_loss(
            h_s, w_s, labels, visual_mask, h_t, w_t, m_t=m_t, block=a.block
        )
        loss.backward()
    seconds = time.time() - t0
    calls, moved, flops, gpu_s = (sum(r[i] for r in traffic.ops.values()) for i in range(4))
    print(
        f"fused_loss, block {a.block} logits ({a.block // len(w_s)} rows), {rows} loss rows "
        f"({a.visual} visual + {a.answer} answer), V {len(w_s)}, bf16 autocast; {calls} aten ops "
        f"({seconds:.0f} s on this CPU)"
    )
    print(
        f"bytes {moved / 2**30:.1f} GiB = {moved / rows / 2**20:.1f} MiB a loss row; "
        f"FLOPs {flops / 1e12:.2f} T = {flops / rows / 1e9:.2f} G a row; "
        f"{a.gpu} roofline {gpu_s * 1e3:.1f} ms ({gpu_s / rows * 1e6:.1f} us a row)"
    )
    top = sorted(traffic.ops.items(), key=lambda kv: -kv[1][3])[:8]
    for name, (n, b, f, s) in top:
        cost = f"{b / 2**30:7.2f} GiB  {f / 1e12:6.2f} TFLOP  {s * 1e3:7.1f} ms"
        print(f"  {name:24s} {n:5d} calls  {cost}")


if __name__ == "__main__":
    main()
