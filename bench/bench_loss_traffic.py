"""The lean loss's GPU cost by arithmetic: every aten op's bytes and FLOPs at the paper's shapes.

    python -m bench.bench_loss_traffic [--visual 729] [--answer 150] [--block N] [--gpu h100]

Runs `fused_loss`'s forward and backward once as the loop calls it on a GPU under DDP and bf16
autocast: one sample (--visual visual + --answer answer rows and a short prompt; V = 151936), the
student's float32 head 1024 wide, the bf16 teacher's 2560 wide, both heads' W^T W given (the
loop's, made once a step or a run); --fsdp: FSDP2's bf16 head. The hidden states and heads are on
the meta device, which takes CUDA's code path (bf16 GEMMs that write float32) on shapes alone; the
masks are on the CPU, as the loop's. Counts each aten op's bytes (its tensor inputs and
outputs; views and allocations are free) and FLOPs (matrix products: 2 m n k), and prints them a
loss row (the rows the blocks take) with the time a GPU would take by a roofline: each op the
larger of FLOPs / peak (by its operands' dtype) and bytes / bandwidth, summed. --device cpu runs
this CPU's path instead. A change to the loss is judged by these figures, not by this CPU's clock.
"""

import argparse
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llava_kd
import memory

# dense peak FLOP/s by the product's dtype, and memory bandwidth (bytes/s), from the vendors' sheets
GPUS = {
    "h100": dict(bf16=989e12, fp32=67e12, bandwidth=2.9e12),  # the H100 figures
    "h200": dict(bf16=989e12, fp32=67e12, bandwidth=4.8e12),
}
PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "addmm_"}
ALLOCATIONS = {"empty", "empty_strided", "empty_like"}


def operands(name, args):
    """The two matrices of a product."""
    return (args[1], args[2]) if name.startswith(("addmm", "baddbmm")) else (args[0], args[1])


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
        # an out= tensor is written, not read (its bytes count once, as the result's)
        given = [*args, *(v for k, v in (kwargs or {}).items() if k != "out")]
        tensors = [x for x in given if torch.is_tensor(x)]
        outs = [x for x in (out if isinstance(out, (list, tuple)) else [out]) if torch.is_tensor(x)]
        if name in ALLOCATIONS:  # memory given, none touched
            outs = []
        moved = sum(x.numel() * x.element_size() for x in tensors + outs)
        product = name in PRODUCTS
        mat = operands(name, args)[0] if product else None
        flops = 2 * outs[0].numel() * mat.shape[-1] if product else 0  # batched: times the batch
        dtype = "bf16" if product and mat.dtype == torch.bfloat16 else "fp32"
        seconds = max(flops / self.gpu[dtype], moved / self.gpu["bandwidth"])
        row = self.ops[name]
        row[0] += 1
        row[1] += moved
        row[2] += flops
        row[3] += seconds
        return out


def sample(visual, answer, device, fsdp=False, prompt=20, V=151936, D_s=1024, D_t=2560, seed=0):
    """One sample's hidden states, heads and masks, as the loop hands them to fused_loss; on the
    meta device the student's hidden states are bf16, which stands for autocast (meta has none)."""
    g = torch.Generator().manual_seed(seed)

    def new(*shape, scale, dtype=torch.float32):
        if device == "meta":
            return torch.empty(shape, dtype=dtype, device="meta")
        return (torch.randn(shape, generator=g) * scale).to(dtype)

    T = 1 + visual + prompt + answer
    h_s = new(1, T, D_s, scale=0.5, dtype=torch.bfloat16 if device == "meta" else torch.float32)
    w_s = new(V, D_s, scale=0.02, dtype=torch.bfloat16 if fsdp else torch.float32)
    h_t = new(1, T, D_t, scale=0.5, dtype=torch.bfloat16)
    w_t = new(V, D_t, scale=0.02, dtype=torch.bfloat16)
    visual_mask = torch.zeros(1, T, dtype=torch.bool)
    visual_mask[0, 1 : 1 + visual] = True
    labels = torch.full((1, T), -100)
    labels[0, T - answer :] = torch.randint(0, V, (answer,), generator=g)
    return h_s.requires_grad_(), w_s.requires_grad_(), h_t, w_t, labels, visual_mask


def report(traffic, what, rows):
    calls, moved, flops, gpu_s = (sum(r[i] for r in traffic.ops.values()) for i in range(4))
    print(
        f"{what}: {calls} aten ops, {moved / 2**30:.1f} GiB = {moved / rows / 2**20:.1f} MiB a "
        f"loss row; {flops / 1e12:.2f} TFLOP = {flops / rows / 1e9:.2f} G a row; roofline "
        f"{gpu_s * 1e3:.1f} ms ({gpu_s / rows * 1e6:.1f} us a row)"
    )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--visual", type=int, default=729)
    ap.add_argument("--answer", type=int, default=150)
    ap.add_argument("--block", type=int, default=memory.LOSS_BLOCK["cuda"], help="logits a block")
    ap.add_argument("--gpu", choices=GPUS, default="h100")
    ap.add_argument(
        "--device", choices=("meta", "cpu"), default="meta", help="cpu: this CPU's path, run"
    )
    ap.add_argument("--fsdp", action="store_true", help="FSDP2's bf16 head (sft and dft's default)")
    a = ap.parse_args()
    h_s, w_s, h_t, w_t, labels, visual_mask = sample(a.visual, a.answer, a.device, a.fsdp)
    m_s, m_t = llava_kd.head_gram(w_s.detach()), llava_kd.head_gram(w_t)  # the loop's
    rows = int((llava_kd.response_rows(labels) | visual_mask).sum())
    cpu = a.device == "cpu"
    traffic = Traffic(GPUS[a.gpu])
    with traffic, torch.autocast("cpu", dtype=torch.bfloat16) if cpu else contextlib.nullcontext():
        args = (h_s, w_s, labels, visual_mask, h_t, w_t)
        loss, _ = llava_kd.fused_loss(*args, m_s=m_s, m_t=m_t, block=a.block)
        loss.backward()
    print(
        f"fused_loss on {a.device} ({'this CPU' if cpu else 'CUDA'}'s path), block {a.block} "
        f"logits ({a.block // len(w_s)} rows), {rows} loss rows ({a.visual} visual + {a.answer} "
        f"answer), V {len(w_s)}, {'FSDP2' if a.fsdp else 'DDP'}, bf16 GEMMs, {a.gpu}'s roofline"
    )
    report(traffic, "a micro-step", rows)
    top = sorted(traffic.ops.items(), key=lambda kv: -kv[1][3])[:8]
    for name, (n, b, f, s) in top:
        cost = f"{b / 2**30:7.2f} GiB  {f / 1e12:6.2f} TFLOP  {s * 1e3:7.1f} ms"
        print(f"  {name:24s} {n:5d} calls  {cost}")
    once = Traffic(GPUS[a.gpu])
    with once:
        llava_kd.head_gram(w_s.detach())
    report(once, "and once an optimizer step, W_s^T W_s (the loop's m_s)", rows)


if __name__ == "__main__":
    main()
