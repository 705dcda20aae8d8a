"""The training loop's pieces that need no training: how a model is built from a config, the help
texts of `densenet train` (data on TrainConfig's fields), and the dataset sizes the cost of a
`densenet reproduce` grid is counted from, and the data checked before training starts.
tests/test_train.py, tests/test_checkpoint.py and tests/test_resume.py train."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from densenet.data import DATASETS, get_dataset_spec
from densenet.recipes import has_dropout
from densenet.registry import create_model, get_entry, list_models
from densenet.train.config import TrainConfig
from densenet.train.engine import build_model

from helpers import cli, make_folder, one_line_error


# --- build_model: dropout goes where the network declares it ------------------------------------------------

ONE_PER_FAMILY = list({get_entry(n).family: n for n in reversed(list_models())}.values())


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_has_dropout_is_what_the_builder_accepts(name):
    """build_model decides by recipes.has_dropout: it must say exactly which builders take drop_rate."""
    with torch.device("meta"):
        try:
            create_model(name, drop_rate=0.1)
            accepts = True
        except ValueError as e:
            assert "drop_rate" in str(e)
            accepts = False
    assert has_dropout(name) == accepts, name


def test_a_network_registered_elsewhere_gets_its_dropout(monkeypatch, capsys):
    """A network registered by a user under a family of their own: whether it takes a dropout rate is
    found by building it with one (a DenseNet copy does; a He 2015 ResNet copy does not)."""
    import dataclasses as dc

    from densenet import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_model(dc.replace(get_entry("densenet_bc_100_k12"), name="my_dn", family="My DenseNets"))
    registry.register_model(dc.replace(get_entry("resnet20"), name="my_rn", family="My ResNets"))
    assert has_dropout("my_dn") and not has_dropout("my_rn")
    with torch.device("meta"):
        model, args = build_model(TrainConfig(model="my_dn", drop_rate=0.2), 10, 3)
    assert args["drop_rate"] == 0.2 and model.config.drop_rate == 0.2 and capsys.readouterr().err == ""


def test_build_model_passes_the_rate_only_to_networks_with_dropout(capsys):
    with torch.device("meta"):
        _, args = build_model(TrainConfig(model="densenet_40_k12", drop_rate=0.2), 10, 3)
        assert args == {"num_classes": 10, "in_channels": 3, "drop_rate": 0.2}
        _, args = build_model(TrainConfig(model="densenet_40_k12", drop_rate=0.0), 10, 3)
        assert args["drop_rate"] == 0.0  # the recipe's 0 wins over the registry's
        assert "note:" not in capsys.readouterr().err
        _, args = build_model(TrainConfig(model="resnet20", drop_rate=0.2), 10, 3)
        assert "drop_rate" not in args
        assert capsys.readouterr().err == "note: resnet20 has no dropout option; training it without dropout\n"
        _, args = build_model(TrainConfig(model="resnet20", drop_rate=0.0), 10, 3)
        assert "drop_rate" not in args and capsys.readouterr().err == ""
        with pytest.raises(ValueError, match="unknown option drop_rate"):  # asked for by name: the builder says no
            build_model(TrainConfig(model="resnet20", model_args={"drop_rate": 0.2}), 10, 3)


# --- --help from the fields' metadata ------------------------------------------------------------------------

def test_every_config_field_has_help_that_states_its_default():
    from densenet.train.config import SETTING_HELP, help_with_default

    assert list(SETTING_HELP) == [f.name for f in dataclasses.fields(TrainConfig)]  # each once, in order
    for f in dataclasses.fields(TrainConfig):
        assert SETTING_HELP[f.name], f.name
        text = help_with_default(f)
        assert "default" in text, (f.name, text)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert help_with_default(fields["seed"]).endswith("(default: 0)")
    assert help_with_default(fields["tensorboard"]).endswith("(default: on)")
    assert help_with_default(fields["compile"]).endswith("(default: off)")
    assert "default: the recipe's: 0.1" in help_with_default(fields["lr"])


def test_train_help_is_built_from_the_config_fields():
    from densenet.cli import build_parser
    from densenet.train.config import SETTING_HELP

    train = build_parser("train")._subparsers._group_actions[0].choices["train"]
    helps = {a.dest: a.help for a in train._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model_args":
            assert helps[f.name].startswith(SETTING_HELP[f.name]), f.name


# --- dataset sizes: one place --------------------------------------------------------------------------------

def test_known_training_set_sizes():
    from densenet.data.sources import SVHN_VAL_PER_CLASS

    assert get_dataset_spec("cifar10").train_size() == get_dataset_spec("cifar100").train_size() == 50_000
    svhn = get_dataset_spec("svhn")
    assert (svhn.train_size(), svhn.train_size(extra=False)) == (604_388, 73_257)
    assert "604,388" in svhn.description
    assert TrainConfig(dataset="svhn").resolve().val_size == 10 * sum(SVHN_VAL_PER_CLASS) == 6_000  # the authors' split: 400 + 200 per class
    assert all(DATASETS[n].train_size() is None for n in ("imagenet", "folder", "digits"))  # counted when loaded
    assert TrainConfig(dataset="cifar10", val_size=5_000).known_train_images() == 45_000
    assert TrainConfig(dataset="svhn", val_size=6_000).known_train_images() == 598_388
    assert TrainConfig(dataset="svhn", svhn_extra=False, val_size=6_000).known_train_images() == 67_257
    assert TrainConfig(dataset="cifar10", val_size=0, train_subset=1_000).known_train_images() == 1_000
    assert TrainConfig(dataset="folder", val_size=5_000).known_train_images() is None
    assert TrainConfig(dataset="folder", val_size=5_000).known_train_images("cifar10") == 45_000
    assert TrainConfig(dataset="cifar10").known_train_images() is None  # the hold-out not resolved yet


def test_reproduce_cost_counts_the_images_each_cell_trains_on(tmp_path, monkeypatch, capsys):
    """C10+ trains on all 50,000 images (the paper's protocol), SVHN on train + extra less the
    authors' 6,000, the CIFAR-10 images given as a folder on 50,000 less a 5,000 hold-out."""
    import densenet.grid.reproduce as reproduce
    from densenet.cli import main

    seen = {}
    real = reproduce.cost

    def cost(cfg, macs, train_images):
        seen[(cfg.dataset, cfg.augment)] = train_images
        return real(cfg, macs, train_images)

    monkeypatch.setattr(reproduce, "cost", cost)
    grid = ["reproduce", "table2", "--out", str(tmp_path / "g"), "--dry-run", "--epochs", "1",
            "--only", "densenet_40_k12/C10+", "--only", "densenet_40_k12/SVHN"]
    assert main(grid) == 0
    assert seen == {("cifar10", "cifar"): 50_000, ("svhn", "none"): 598_388}
    (tmp_path / "c10" / "train").mkdir(parents=True)
    seen.clear()
    assert main(grid[:-2] + ["--data", f"cifar10={tmp_path / 'c10'}"]) == 0
    assert seen == {("folder", "cifar"): 45_000}
    capsys.readouterr()


# --- evaluate and the CUDA numerics of a run ----------------------------------------------------------------

def test_evaluate_sums_on_the_device_what_a_per_batch_count_gives():
    """One sync per evaluation (the sums stay on the device), the same figures as counting per batch."""
    import torch.nn.functional as F

    from densenet.train.engine import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))
    batches = [(torch.randn(n, 3, 2, 2), torch.randint(0, 7, (n,))) for n in (5, 8, 1)]
    r = evaluate(model, batches)
    with torch.no_grad():
        logp = [F.log_softmax(model(x), 1) for x, _ in batches]
    ys = [y for _, y in batches]
    top1 = sum((lp.argmax(1) == y).sum().item() for lp, y in zip(logp, ys))
    top5 = sum((lp.topk(5, 1).indices == y[:, None]).any(1).sum().item() for lp, y in zip(logp, ys))
    loss = sum(F.nll_loss(lp, y, reduction="sum").item() for lp, y in zip(logp, ys))
    assert r["images"] == 14
    assert r["top1_error"] == pytest.approx(100 * (1 - top1 / 14))
    assert r["top5_error"] == pytest.approx(100 * (1 - top5 / 14))
    assert r["loss"] == pytest.approx(loss / 14, rel=1e-12)


def test_cuda_numerics_match_tf32_and_autotune_then_restore():
    """On CUDA a run's matrix products take TF32 exactly when cuDNN's convolutions do (the fused path's 1x1
    products and the reference path's cuDNN convolutions then round alike) and cuDNN autotunes; the
    flags are put back afterwards. Elsewhere nothing changes. (The flags are settable without a GPU.)"""
    from densenet.train.engine import cuda_numerics

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32
    with cuda_numerics(torch.device("cpu")):
        assert (cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32) == before
    with cuda_numerics(torch.device("cuda")):
        assert cudnn.benchmark is True and matmul.allow_tf32 == cudnn.allow_tf32
    assert (cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32) == before


# --- input checks before training ----------------------------------------------------------------------


def test_imagenet_augmentation_of_a_grayscale_stream_is_one_line(tmp_path):
    """Colour jitter and PCA lighting are defined for RGB: a 1-channel streamed folder is refused up
    front (it was an IndexError in a loading worker)."""
    folder = make_folder(tmp_path / "shapes", per_class=4, test_per_class=1, size=8)
    code, err = cli("train", "--dataset", "folder", "--data", folder, "--no-in-memory", "--image-size", "8",
                    "--resize", "8", "--workers", "0", "--epochs", "1", "--batch-size", "4", "--val-size", "0",
                    "--depth", "10", "--growth-rate", "6", "--no-progress", "--model-arg", "in_channels=1")
    one_line_error(code, err, "needs RGB images", "--augment none")
