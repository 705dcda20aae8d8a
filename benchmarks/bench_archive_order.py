"""Loading time of a .tar.gz image folder whose members are stored sorted, reversed or shuffled.

    PYTHONPATH=src python benchmarks/bench_archive_order.py [--images 8000]

Random access into a .tar.gz decompresses from the start again for every backward seek, so an
archive read member by member in sorted order took quadratic time when stored in another order;
`load_folder` now reads it in one sequential pass.
"""
from __future__ import annotations

import argparse
import io
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from densenet.data.sources import load_folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    files = {}
    for i in range(args.images):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(b, "PNG")
        files[f"d/train/c{i % 10}/{i:06d}.png"] = b.getvalue()
    names = sorted(files)
    orders = {"sorted": names, "reversed": names[::-1], "shuffled": list(rng.permutation(names))}
    print(f"# {args.images} 32x32 PNGs; {platform.processor() or platform.machine()}; "
          f"{time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        orders = {"warm-up": names[:200], **orders}  # imports and first calls, not timed below
        for kind, order in orders.items():
            path = Path(tmp) / f"{kind}.tar.gz"
            with tarfile.open(path, "w:gz") as tf:
                for n in order:
                    info = tarfile.TarInfo(n)
                    info.size = len(files[n])
                    tf.addfile(info, io.BytesIO(files[n]))
            t = time.perf_counter()
            load_folder(path)
            if kind != "warm-up":
                print(f"{kind:<9} {time.perf_counter() - t:6.2f} s")


if __name__ == "__main__":
    main()
