"""The bottleneck's 1x1 convolution of a dense layer, four ways, at the shapes of DenseNet-BC-100's blocks.

    python benchmarks/bench_bottleneck.py                 # ~1 min on 2 cores
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_bottleneck.py

The fused block (models/_fused.py) keeps each block's maps channel-major, (c, N) with N = B*H*W, and
computes the 1x1 convolution of the normalised input z as a matrix product, (N, 4k) = z^T W^T. This
compares, in GFLOP/s (best of 7; batch 64, k = 12, so 4k = 48 outputs):
  mm chan-major   torch.mm on the channel-major z (what the fused block does)
  mm pix-major    torch.mm on a pixel-major copy of z
  onednn cl       F.conv2d (oneDNN) on a channels_last z
  onednn view     F.conv2d on the channel-major z seen as (B, c, H, W)
  transpose       the copy of z to pixel-major alone, as the GFLOP/s of the product it would serve
and the backward pass (both products: dW and dz): mm against oneDNN channels_last.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(204, 32), (300, 16), (342, 8)]  # the widest layer input of each block, and its map size


def best(f, n: int = 7) -> float:
    f()
    f()
    t = float("inf")
    for _ in range(n):
        s = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - s)
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} threads, batch {args.batch}; GFLOP/s")
    for c, hw in SHAPES:
        b, n = args.batch, args.batch * hw * hw
        z, w = torch.randn(c, n), torch.randn(48, c)
        zp = z.t().contiguous()
        g = torch.randn(n, 48)
        w4 = w.view(48, c, 1, 1)
        w4cl = w4.contiguous(memory_format=torch.channels_last)
        xcl = zp.view(b, hw, hw, c).permute(0, 3, 1, 2)
        gcl = g.view(b, hw, hw, 48).permute(0, 3, 1, 2)
        flop = 2 * c * 48 * n
        r = {"mm chan-major": best(lambda: torch.mm(z.t(), w.t())),
             "mm pix-major": best(lambda: torch.mm(zp, w.t())),
             "onednn cl": best(lambda: F.conv2d(xcl, w4cl)),
             "onednn view": best(lambda: F.conv2d(z.view(c, b, hw, hw).permute(1, 0, 2, 3), w4)),
             "transpose": best(lambda: zp.copy_(z.t()))}
        back = {"mm": best(lambda: (torch.mm(g.t(), z.t()), torch.mm(w.t(), g.t()))),
                "onednn cl": best(lambda: torch.ops.aten.convolution_backward(
                    gcl, xcl, w4cl, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False]))}
        print(f"(c={c}, N={n}) forward: " + "  ".join(f"{k} {flop / t / 1e9:.0f}" for k, t in r.items())
              + " | backward: " + "  ".join(f"{k} {2 * flop / t / 1e9:.0f}" for k, t in back.items()), flush=True)


if __name__ == "__main__":
    main()
