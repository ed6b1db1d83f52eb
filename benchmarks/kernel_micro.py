"""Kernel micro-benchmarks behind two of the engine's Inductor settings (docs/benchmarks.md, levers
K/L): GELU + float8 quantization with the tanh and sigmoid forms, with and without coordinate-descent
tuning, under Inductor's other defaults (not the persistent rows and unsplit reductions the engine
also sets, lever P); float8 matmul shapes of the FLUX DiT with row-wise and tensor-wise scales (fast
accumulation in both); SDPA backends.

    python benchmarks/kernel_micro.py        # needs a CUDA GPU with float8 (Ada/Hopper)
"""

import sys
from pathlib import Path

import torch
import torch._inductor.config as ic
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cuda_timing import graph_us as bench  # same directory

from bot.engine.fp8 import quantize_rowwise as quant  # the engine's quantizer, uncompiled
from bot.engine.inductor import gelu_as_sigmoid

torch.manual_seed(0)
dev = "cuda"


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def gelu_sig(x):  # the engine's GELU (bot/engine/inductor.py), in float32 as Inductor computes it
    return gelu_as_sigmoid(x.float(), "tanh").to(x.dtype)


def make_single(gelu):
    def f(attn, h):
        mlp = gelu(h[:, :, 9216:])
        return quant(torch.cat([attn, mlp], dim=2).reshape(-1, 15360))

    return f


def make_double(gelu):
    def f(h):
        return quant(gelu(h).reshape(-1, 12288))

    return f


attn = torch.randn(1, 4608, 3072, device=dev, dtype=torch.bfloat16)
h = torch.randn(1, 4608, 21504, device=dev, dtype=torch.bfloat16)
hd = torch.randn(1, 4096, 12288, device=dev, dtype=torch.bfloat16)
for cd in (False, True):
    ic.coordinate_descent_tuning = cd
    for name, g in (("tanh", gelu_tanh), ("sigmoid", gelu_sig)):
        torch._dynamo.reset()
        fs = torch.compile(make_single(g), fullgraph=True)
        fd = torch.compile(make_double(g), fullgraph=True)
        print(
            f"cd={cd} gelu={name}: single quant {bench(fs, attn, h):.1f} us, double quant {bench(fd, hd):.1f} us",
            flush=True,
        )
    torch._dynamo.reset()
# exactness of the sigmoid form
x = torch.randn(1 << 20, device=dev) * 4
print("gelu forms max diff (fp32):", (F.gelu(x, approximate="tanh") - gelu_sig(x).float()).abs().max().item())
# matmuls: rowwise vs tensorwise, fast accum
shapes = {
    "single.l1": (4608, 3072, 21504),
    "single.l2": (4608, 15360, 3072),
    "dbl.qkv": (4096, 3072, 9216),
    "dbl.ff1": (4096, 3072, 12288),
    "dbl.ff2": (4096, 12288, 3072),
    "dbl.out": (4096, 3072, 3072),
    "txt.ff1": (512, 3072, 12288),
}


def scaled_mm(a, b, sa, sb):
    return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True)


for nm, (m, k, n) in shapes.items():
    a = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(m, 1, device=dev) + 0.5, torch.ones(1, n, device=dev)
    one = torch.ones((), device=dev)
    rw = bench(scaled_mm, a, b, sa, sb)
    tw = bench(scaled_mm, a, b, one, one)
    fl = 2 * m * k * n
    print(
        f"{nm} {m}x{k}x{n}: rowwise {rw:.1f} us ({fl / rw / 1e6:.0f} TF/s), tensorwise {tw:.1f} us ({fl / tw / 1e6:.0f} TF/s)",
        flush=True,
    )
# attention backends
q, k, v = (torch.randn(1, 24, 4608, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
    try:
        with sdpa_kernel([be]):
            t = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        print(f"sdpa {be.name}: {t:.1f} us ({4 * 4608 * 4608 * 3072 / t / 1e6:.0f} TF/s)", flush=True)
    except Exception as e:
        print("sdpa", be.name, "failed", str(e)[:100])
