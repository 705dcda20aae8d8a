"""Data: the paper's augmentation (shapes and statistics), the fixed balanced validation split,
dataset readers (folder, archive, digits) and the missing-data messages."""
from __future__ import annotations

import tarfile

import pytest
import torch

from densenet.data import DataError, balanced_split, channel_stats, load_splits
from densenet.data.loader import Batches, StreamBatches
from densenet.data.sources import ImageSet, StreamSet
from densenet.data.transforms import Normalization, random_crop, random_flip, ten_crop

from helpers import CLASSES, make_folder


def test_random_crop_is_a_window_of_the_zero_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32) + 1
    out = random_crop(x, (32, 32), 4, g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for b in range(2):
        found = [(i, j) for i in range(9) for j in range(9) if torch.equal(padded[b, :, i:i + 32, j:j + 32], out[b])]
        assert len(found) == 1


def test_crop_offsets_are_uniform_and_padding_is_zero():
    """Over many crops, each of the 9x9 offsets appears equally often; the expected fraction of
    padded (zero) pixels in a crop of a 32x32 image padded by 4 is 1 - E[overlap]^2/1024."""
    g = torch.Generator().manual_seed(1)
    x = torch.ones(20000, 1, 32, 32)
    out = random_crop(x, (32, 32), 4, g)
    zero_frac = (out == 0).float().mean().item()
    mean_overlap_1d = sum(32 - abs(o - 4) for o in range(9)) / 9  # rows (or cols) inside the image
    expected = 1 - (mean_overlap_1d / 32) ** 2
    assert zero_frac == pytest.approx(expected, abs=0.003)


def test_flip_probability_one_half():
    g = torch.Generator().manual_seed(2)
    x = torch.arange(4.0).view(1, 1, 1, 4).repeat(10000, 1, 1, 1)
    out = random_flip(x, g)
    flipped = (out[:, 0, 0, 0] == 3).float().mean().item()
    assert flipped == pytest.approx(0.5, abs=0.02)
    assert torch.equal(out[out[:, 0, 0, 0] == 3][0, 0, 0], torch.tensor([3.0, 2, 1, 0]))


def test_normalisation_uses_training_set_statistics():
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (500, 3, 8, 8), generator=g, dtype=torch.uint8)
    images[:, 1] //= 2
    norm = channel_stats(images)
    x = norm(images)
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert norm.mean[1] == pytest.approx(images[:, 1].double().mean().item() / 255, rel=1e-6)


def test_ten_crop():
    x = torch.arange(36.0).view(1, 1, 6, 6)
    crops = ten_crop(x, (4, 4))
    assert crops.shape == (10, 1, 1, 4, 4)
    assert torch.equal(crops[0], x[..., :4, :4]) and torch.equal(crops[3], x[..., 2:, 2:])
    assert torch.equal(crops[4], x[..., 1:5, 1:5]) and torch.equal(crops[9], crops[4].flip(-1))


def test_balanced_split_is_fixed_balanced_and_disjoint():
    labels = torch.arange(10).repeat_interleave(500)[torch.randperm(5000)]
    tr, va = balanced_split(labels, 1000, seed=0)
    tr2, va2 = balanced_split(labels, 1000, seed=0)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert len(va) == 1000 and len(tr) == 4000
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert labels[va].bincount().tolist() == [100] * 10
    assert not torch.equal(balanced_split(labels, 1000, seed=1)[1], va)
    with pytest.raises(DataError, match="--val-size 5000 must be between 1 and 4999"):
        balanced_split(labels, 5000, seed=0)


def test_batches_are_a_function_of_seed_epoch_and_step():
    data = ImageSet(torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8), torch.arange(100) % 4)
    norm = Normalization((0.5,) * 3, (0.25,) * 3)
    b = Batches(data, 16, norm, augment="cifar", shuffle=True, seed=5)
    full = list(b.iterate(epoch=2))
    resumed = list(b.iterate(epoch=2, start=3))
    assert len(full) == 7 and len(resumed) == 4
    for (x1, y1), (x2, y2) in zip(full[3:], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(full[0][1], next(b.iterate(epoch=3))[1])  # a new order each epoch
    # two processes each take their half of every global batch, augmented identically
    halves = [list(Batches(data, 16, norm, augment="cifar", shuffle=True, seed=5, rank=r, world_size=2).iterate(2))
              for r in range(2)]
    for (x, y), (xa, ya), (xb, yb) in zip(full, *halves):
        assert torch.equal(torch.cat([xa, xb]), x) and torch.equal(torch.cat([ya, yb]), y)


def test_every_process_gets_a_batch_at_every_step(tmp_path):
    """Under DDP every process must take part in every step (each waits for the others' gradients): a
    last global batch too small to give each process an image is left out, for in-memory and streamed
    data alike (8 images on 3 processes, batch 6: the last 2 images used to leave one process without a batch)."""
    norm = Normalization((0.5,), (0.25,))
    for n in range(1, 30):
        data = ImageSet(torch.zeros((n, 1, 4, 4), dtype=torch.uint8), torch.arange(n) % 3)
        for world, batch in [(2, 2), (2, 8), (3, 6), (4, 8), (8, 16)]:
            ranks = [list(Batches(data, batch, norm, rank=r, world_size=world)) for r in range(world)]
            assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(Batches(data, batch, norm, world_size=world))
            assert all(len(y) > 0 for r in ranks for _, y in r), (n, world, batch)
            kept = sum(len(y) for r in ranks for _, y in r)  # only a last batch of fewer than world images goes
            assert n - kept == (n % batch if 0 < n % batch and (world - 1) * -(-(n % batch) // world) >= n % batch
                                else 0), (n, world, batch)
    from PIL import Image

    for i in range(24):
        Image.new("L", (4, 4), i).save(tmp_path / f"{i}.png")
    data = StreamSet([(str(tmp_path / f"{i}.png"), i % 3) for i in range(24)])  # streamed: the same rule
    to_tensor = __import__("torchvision").transforms.ToTensor()
    for world, batch, steps in [(8, 16, 2), (2, 16, 2), (4, 8, 3), (2, 10, 3), (4, 12, 2), (8, 8, 3)]:
        ranks = [list(StreamBatches(data, batch, to_tensor, channels=1, workers=0, rank=r, world_size=world))
                 for r in range(world)]
        assert [len(r) for r in ranks] == [steps] * world and all(len(y) > 0 for r in ranks for _, y in r)


def test_folder_directory_and_archive(tmp_path):
    root = make_folder(tmp_path / "shapes", per_class=5, test_per_class=2)
    s = load_splits("folder", root)
    assert s.classes == sorted(CLASSES) and s.train.images.shape == (15, 3, 12, 12)
    assert s.test.images.shape == (6, 3, 12, 12) and s.train.labels.bincount().tolist() == [5, 5, 5]
    archive = tmp_path / "shapes.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="shapes")
    a = load_splits("folder", archive)
    assert torch.equal(a.train.images, s.train.images) and torch.equal(a.test.labels, s.test.labels)
    gray = load_splits("folder", root, in_channels=1)
    assert gray.train.images.shape == (15, 1, 12, 12)


def test_digits_offline():
    s = load_splits("digits")
    assert s.train.images.shape == (1437, 1, 8, 8) and len(s.test) == 360 and s.in_channels == 1


@pytest.mark.parametrize("name, match", [
    ("cifar10", r"CIFAR-10 not found in .*empty.*cifar-10-batches-py.*--download"),
    ("cifar100", r"CIFAR-100 not found in .*--download"),
    ("svhn", r"SVHN not found in .*train_32x32.mat.*--download"),
    ("folder", r"no train/ folder found in .*empty"),
])
def test_missing_data_is_one_clear_message(tmp_path, name, match):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=match):
        load_splits(name, tmp_path / "empty")


def test_missing_path_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="needs --data PATH"):
        load_splits("cifar10", None)
    with pytest.raises(DataError, match="does not exist"):
        load_splits("folder", tmp_path / "nope")
    with pytest.raises(DataError, match="unknown dataset 'cifar11'"):
        load_splits("cifar11", tmp_path)


def test_corrupt_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "f", per_class=2, test_per_class=1)
    (root / "train" / "circle" / "0000.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"0000.png is not a readable image"):
        load_splits("folder", root)


@pytest.mark.slow
def test_cifar10_archive_reads_through_folder(cifar_archive):
    s = load_splits("folder", cifar_archive)
    assert s.train.images.shape == (50000, 3, 32, 32) and s.test is None
    assert s.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert s.train.labels.bincount().tolist() == [5000] * 10


def test_only_the_asked_split_of_a_folder_is_read(tmp_path):
    root = make_folder(tmp_path / "f", per_class=2, test_per_class=2)
    (root / "train" / CLASSES[1] / "0001.png").write_bytes(b"not an image")  # decoding train/ would fail
    with pytest.raises(DataError, match="0001.png"):
        load_splits("folder", root)
    s = load_splits("folder", root, only=("test",))
    assert s.train is None and s.val is None and s.classes == list(CLASSES)
    assert s.test.images.shape == (6, 3, 12, 12) and s.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
