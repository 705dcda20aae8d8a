"""`--download` is real code: torchvision's downloader fetches the official archives. Here it fetches
small archives in the official formats from an HTTP server on the loopback interface (no network),
and the readers load them."""
from __future__ import annotations

import functools
import hashlib
import http.server
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch

from densenet.data import load_splits

from helpers import run_main


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def serve(tmp_path):
    """Serve tmp_path over HTTP on 127.0.0.1; returns a function path -> URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield lambda p: f"http://127.0.0.1:{server.server_port}/{p.relative_to(tmp_path).as_posix()}"
    server.shutdown()


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch, serve):
    """A CIFAR-10 python archive with 5 x 4 training and 6 test images, served from a file:// URL."""
    from torchvision.datasets import CIFAR10

    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_list, images = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        images.append(data)
        with open(src / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": [i % 10, 1, 2, 3]}, f)
        train_list.append([f"data_batch_{i}", md5(src / f"data_batch_{i}")])
    with open(src / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3, 4, 5]}, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="cifar-10-batches-py")
    monkeypatch.setattr(CIFAR10, "url", serve(archive))
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5(archive))
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(src / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": md5(src / "batches.meta")})
    return np.concatenate(images)


def test_cifar10_download_then_read_offline(tmp_path, fake_cifar10):
    root = tmp_path / "data"
    s = load_splits("cifar10", root, download=True)
    assert (root / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert s.train.images.shape == (20, 3, 32, 32) and len(s.test) == 6
    # the official layout: 3072 bytes = R plane, G plane, B plane of 32x32
    assert torch.equal(s.train.images[0], torch.from_numpy(fake_cifar10[0].reshape(3, 32, 32)))
    assert s.classes[0] == "airplane"
    again = load_splits("cifar10", root)  # now offline, from disk
    assert torch.equal(again.train.images, s.train.images)


def test_svhn_download_then_read(tmp_path, monkeypatch, serve):
    from scipy.io import savemat
    from torchvision.datasets import SVHN

    rng = np.random.default_rng(1)
    split_list = {}
    for split, n in (("train", 5), ("test", 3), ("extra", 4)):
        f = tmp_path / "src" / f"{split}_32x32.mat"
        f.parent.mkdir(exist_ok=True)
        # the official layout: X is (32, 32, 3, N), y in 1..10 with 10 meaning the digit 0
        savemat(f, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                    "y": np.array([[10], [1], [2], [3], [4]][:n], dtype=np.uint8)})
        split_list[split] = [serve(f), f.name, md5(f)]
    monkeypatch.setattr(SVHN, "split_list", split_list)
    s = load_splits("svhn", tmp_path / "data", download=True)
    assert s.train.images.shape == (9, 3, 32, 32)  # train + extra, as the paper
    assert s.train.labels[:2].tolist() == [0, 1] and len(s.test) == 3
    only = load_splits("svhn", tmp_path / "data", svhn_extra=False)
    assert len(only.train) == 5


# --- without a network: what failed and what to do -----------------------------------------------------


def test_download_without_a_network_says_what_and_how(tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, _, err = run_main(capsys, "train", "--dataset", "cifar10", "--data", tmp_path / "c", "--download")
    assert code == 2 and err.count("\n") == 1, err
    assert "could not fetch CIFAR-10 from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in err
    assert f"unpack it in {tmp_path / 'c'} (giving {tmp_path / 'c' / 'cifar-10-batches-py'}/)" in err
    assert "without --download" in err
