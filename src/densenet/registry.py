"""Named variants: one row per network of the papers' tables, `create_model` and `list_models`.

A variant is data: its builder's defaults plus what the paper reports about it (parameter count,
multiply-adds). Overrides use the paper's names: `depth`, `growth_rate`, `bottleneck`, `compression`,
`drop_rate`, `in_channels`, `memory_efficient`, ...
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from .models.densenet import densenet_cifar, densenet_imagenet
from .models.preact import preact_resnet_cifar, wide_resnet
from .models.resnet import resnet_cifar, resnet_imagenet, resnext_cifar, resnext_imagenet


@dataclass(frozen=True)
class ModelEntry:
    """A registered network and what its paper says about it."""

    name: str
    family: str  # groups `densenet models`
    builder: Callable[..., nn.Module]  # builder(**overrides) -> model
    input_size: tuple[int, int, int]  # (C, H, W) the paper evaluates it at
    num_classes: int  # the paper's classifier size, used for the published counts
    paper_params: int | None = None  # the published count: exact where the rules give one, else as printed
    paper_gmacs: float | None = None  # multiply-adds per image at input_size, x10^9
    description: str = ""
    params_tolerance: int = 0  # 0: paper_params is exact; else how far a count printed as "0.27M" may be


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def list_models(filter: str | list[str] = "", *, family: str | None = None, pretrained: bool = False,
                exclude_filters: str | list[str] = "") -> list[str]:
    """Registered names, in registration order (the papers' table order). As timm's: `filter` and
    `exclude_filters` are shell-style wildcards ("densenet*", ["resnet*", "wrn_*"]); `pretrained=True`
    keeps the networks with published weights (`pretrained=True` in create_model finds them)."""
    import fnmatch

    from .pretrained import has_pretrained

    def patterns(p):
        return [p] if isinstance(p, str) else list(p)

    names = [n for n, e in _REGISTRY.items() if family is None or e.family == family]
    include, exclude = [p for p in patterns(filter) if p], [p for p in patterns(exclude_filters) if p]
    if include:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    return [n for n in names if has_pretrained(n)] if pretrained else names


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} `densenet models` lists the "
                         f"{len(_REGISTRY)} registered names.") from None


def create_model(name: str, pretrained: bool | str | Path | None = False, *, weights: Any = None,
                 reset_classifier: bool = False, features_only: bool = False,
                 out_indices: tuple[int, ...] | None = None, **overrides: Any) -> nn.Module:
    """Build a registered network, as timm's create_model.

    `pretrained`: False; True (torchvision's ImageNet weights, where they exist, from torch's cache:
    an error says where to get them otherwise); a checkpoint path (torchvision's or this package's);
    or "hf-hub:org/repo" (weights pushed with `densenet.push_to_hub`). `weights` is torchvision's way to say
    pretrained=True (give one of the two): None, a Weights enum member (densenet.models.DenseNet121_Weights's,
    or torchvision's own), its name ("IMAGENET1K_V1", "DenseNet121_Weights.IMAGENET1K_V1") or "DEFAULT"
    (where torchvision's DEFAULT is a file this package does not load, e.g. resnet50's IMAGENET1K_V2, a
    ValueError names the one it does),
    naming the torchvision file this package loads for `name`. `reset_classifier=True` loads
    everything but the classifier (fine-tuning to other classes). timm's names are accepted:
    `in_chans` (= in_channels), `num_classes=0` (no classifier: the model returns pooled features),
    `global_pool` ("avg", the paper's; "max", "avgmax", or "" for unpooled maps), `features_only=True`
    with `out_indices` (timm's indices: 0 the stem, 1 to n the stages; see features.py).
    The model carries `pretrained_cfg`: its input size, mean/std and crop (`resolve_data_config`)."""
    from .pretrained import resolve_pretrained

    entry = get_entry(name)
    if "in_chans" in overrides:
        if "in_channels" in overrides:
            raise ValueError("give in_chans or in_channels (the same option), not both")
        overrides["in_channels"] = overrides.pop("in_chans")
    if weights is not None:
        if pretrained is not None and pretrained is not False:
            raise ValueError(f"give weights= (torchvision's argument) or pretrained= (timm's), not both: "
                             f"weights={weights!r}, pretrained={pretrained!r}")
        pretrained = _weights_as_pretrained(name, weights)
    source = resolve_pretrained(name, pretrained)
    overrides.setdefault("num_classes", entry.num_classes)
    model_args = dict(overrides)  # what rebuilds this model: create_model(name, **model.model_args)
    global_pool = overrides.pop("global_pool", None)
    headless = overrides["num_classes"] == 0 and source is not None
    if headless:  # load the checkpoint's classifier-free weights into a model without one
        overrides["num_classes"] = 1
    model = entry.builder(**overrides)
    model.model_name, model.model_args = name, model_args
    if source is not None:
        if source.startswith("hf-hub:"):
            from .hub_files import load_from_hub

            load_from_hub(model, source[len("hf-hub:"):], reset_classifier=reset_classifier or headless)
        else:
            from .weights import load_pretrained

            load_pretrained(model, source, reset_classifier=reset_classifier or headless)
    if headless:
        model.reset_classifier(0)
    if global_pool is not None:
        model.set_global_pool(global_pool)
    cfg = getattr(model, "config", None)
    model.pretrained_cfg = pretrained_cfg(name, getattr(cfg, "in_channels", None), getattr(cfg, "num_classes", None))
    if features_only:
        from .features import FeatureListNet

        return FeatureListNet(model, out_indices)
    if out_indices is not None:
        raise ValueError("out_indices selects stages of a features_only=True model; pass features_only=True")
    return model


def _weights_as_pretrained(name: str, weights: Any) -> bool:
    """create_model's `weights` as its `pretrained`: False for None; True where `weights` names the
    torchvision file this package loads for `name` (from torch's cache, as pretrained=True); else ValueError.
    Names are torchvision's, read from its enum for the network (`get_model_weights(name)`): a member of
    that enum or of densenet.models' copy of it is known by its URL; a name, by torchvision's `verify`."""
    if weights is None:
        return False
    from torchvision.models import WeightsEnum, get_model_weights

    from .pretrained import _TV, TORCHVISION_FILES, resolve_pretrained

    if name not in TORCHVISION_FILES:
        resolve_pretrained(name, True)  # raises: no published weights exist for this network
    enum, file = get_model_weights(name), TORCHVISION_FILES[name]
    if isinstance(weights, str):
        try:
            weights = enum.verify(weights)
        except KeyError:
            raise ValueError(f"weights={weights!r}: {enum.__name__} has {', '.join(enum.__members__)} (or None: "
                             f"no weights)") from None
    if not isinstance(weights, WeightsEnum):
        raise ValueError(f"weights must be None, a Weights enum member ({enum.__name__}.IMAGENET1K_V1) or its "
                         f"name, got {weights!r}")
    if weights.url == _TV + file:
        return True
    if type(weights).__name__ != enum.__name__:
        raise ValueError(f"Invalid Weight class provided; expected {enum.__name__} but received "
                         f"{type(weights).__name__}.")
    raise ValueError(f"{name}: {weights!r} ({weights.url}) is not a file this package loads; its weights are "
                     f"torchvision's IMAGENET1K_V1, {file} (weights='IMAGENET1K_V1')")


def pretrained_cfg(name: str, in_channels: int | None = None, num_classes: int | None = None) -> dict[str, Any]:
    """timm-style preprocessing and provenance of a registered network: input_size, mean, std,
    crop_pct, crop_mode, interpolation, num_classes, first_conv, classifier, and url/file where
    published weights exist."""
    from .pretrained import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, TORCHVISION_FILES, _TV

    entry = get_entry(name)
    imagenet = entry.input_size[-1] >= 224
    c = entry.input_size[0] if in_channels is None else in_channels
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (CIFAR10_MEAN, CIFAR10_STD)
    if c == 1:  # a 1-channel model loaded from RGB weights sums their filters: gray = equal RGB
        mean, std = (round(sum(mean) / 3, 4),), (round(sum(std) / 3, 4),)
    elif c != 3:
        mean, std = (mean * c)[:c], (std * c)[:c]
    resnet = entry.family.startswith(("ResNet", "ResNeXt", "Pre-activation", "Wide"))
    cfg: dict[str, Any] = {
        "architecture": name, "input_size": (c, *entry.input_size[1:]), "mean": mean, "std": std,
        # ImageNet: resize to 256 then centre-crop 224 (crop_pct 0.875), torchvision's evaluation;
        # CIFAR/SVHN: the 32x32 image as it is
        "crop_pct": 0.875 if imagenet else 1.0, "crop_mode": "center", "interpolation": "bilinear",
        "pool_size": tuple(s // (32 if imagenet else 4) for s in entry.input_size[1:]),  # the final maps' size
        "num_classes": entry.num_classes if num_classes is None else num_classes,
        "first_conv": "conv1" if resnet else "features.conv0",
        "classifier": "fc" if resnet else "classifier",
        "url": None, "file": None, "source": None, "license": None,
    }
    if name in TORCHVISION_FILES:
        cfg.update(url=_TV + TORCHVISION_FILES[name], file=TORCHVISION_FILES[name], source="torchvision",
                   license="bsd-3-clause (torchvision)")
    return cfg



# --- DenseNet on CIFAR/SVHN (Table 2) ---------------------------------------------------------------

def _cifar_entry(name, depth, k, bc, params, gmacs, label):
    def build(**kw):
        kw.setdefault("depth", depth)
        kw.setdefault("growth_rate", k)
        kw.setdefault("bottleneck", bc)
        kw.setdefault("compression", 0.5 if bc else 1.0)
        return densenet_cifar(**kw)

    register_model(ModelEntry(name, "DenseNet (CIFAR/SVHN)", build, (3, 32, 32), 10, params, gmacs,
                              f"{label} (L={depth}, k={k}), Table 2"))


_cifar_entry("densenet_40_k12", 40, 12, False, 1_019_722, 0.265, "DenseNet")
_cifar_entry("densenet_100_k12", 100, 12, False, 6_979_642, 1.770, "DenseNet")
_cifar_entry("densenet_100_k24", 100, 24, False, 27_249_082, 6.889, "DenseNet")
_cifar_entry("densenet_bc_100_k12", 100, 12, True, 769_162, 0.288, "DenseNet-BC")
_cifar_entry("densenet_bc_250_k24", 250, 24, True, 15_324_406, 5.419, "DenseNet-BC")
_cifar_entry("densenet_bc_190_k40", 190, 40, True, 25_624_430, 9.302, "DenseNet-BC")


def _imagenet_entry(name, depth, k, params, gmacs, blocks=None):
    def build(**kw):
        if blocks is not None:
            kw.setdefault("block_config", blocks)
            kw.setdefault("depth", None)
        else:
            kw.setdefault("depth", depth)
        kw.setdefault("growth_rate", k)
        return densenet_imagenet(**kw)

    register_model(ModelEntry(name, "DenseNet (ImageNet)", build, (3, 224, 224), 1000, params, gmacs,
                              f"DenseNet-BC-{name[8:]} (k={k}), Table 1"))


_imagenet_entry("densenet121", 121, 32, 7_978_856, 2.834)
_imagenet_entry("densenet169", 169, 32, 14_149_480, 3.360)
_imagenet_entry("densenet201", 201, 32, 20_013_928, 4.291)
_imagenet_entry("densenet264", 264, 32, 33_337_704, 5.752)
_imagenet_entry("densenet161", 161, 48, 28_681_000, 7.728, blocks=(6, 12, 36, 24))


# --- Baselines the paper compares against ----------------------------------------------------------------

def _printed(millions: str, truncated: bool = False) -> tuple[int, int]:
    """A count printed as e.g. "0.27M": (270,000, tolerance). Rounded to the printed digits the rules'
    count must lie within half a unit of the last digit; where the paper truncated, within one unit."""
    d = Decimal(millions)
    unit = 10 ** (6 + d.as_tuple().exponent)
    return int(d * 10**6), unit if truncated else unit // 2


def _baseline(name: str, family: str, builder: Callable[..., nn.Module], input_size: tuple[int, int, int],
              num_classes: int, params: int | tuple[int, int] | None, gmacs: float | None, description: str,
              **defaults: Any) -> None:
    def build(**kw):
        for k, v in defaults.items():
            kw.setdefault(k, v)
        return builder(**kw)

    params, tol = params if isinstance(params, tuple) else (params, 0)
    register_model(ModelEntry(name, family, build, input_size, num_classes, params, gmacs, description, tol))


# He 2015 Table 1, with torchvision's module names and weights (which stride a bottleneck's 3x3; He 2015's
# own models stride its first 1x1: stride_in_1x1=True). Exact counts and MACs are torchvision's.
_IMAGENET = (3, 224, 224)
for _d, _p, _g in [(18, 11_689_512, 1.814), (34, 21_797_672, 3.664), (50, 25_557_032, 4.089),
                   (101, 44_549_160, 7.801), (152, 60_192_808, 11.514)]:
    _baseline(f"resnet{_d}", "ResNet (ImageNet)", resnet_imagenet, _IMAGENET, 1000, _p, _g,
              f"ResNet-{_d} (He 2015 Table 1), projection shortcuts (B)"
              + (", stride on the 3x3 as torchvision" if _d >= 50 else ""), depth=_d)
for _d in (18, 34):
    _baseline(f"plain{_d}", "ResNet (ImageNet)", resnet_imagenet, _IMAGENET, 1000, None, None,
              f"{_d}-layer plain net (He 2015 Fig. 4): resnet{_d}'s layers, no shortcuts", depth=_d, residual=False)

# He 2015 Fig. 4 (right): ResNet-18/34 with zero-padding identity shortcuts (option A), which "have no
# extra parameter compared to their plain counterparts" (plain18/34): torchvision's count less the three
# projection shortcuts (1x1 convolution and BN each: 173,824 parameters).
for _d, _p in [(18, 11_689_512 - 173_824), (34, 21_797_672 - 173_824)]:
    _baseline(f"resnet{_d}_a", "ResNet (ImageNet)", resnet_imagenet, _IMAGENET, 1000, _p, None,
              f"ResNet-{_d} with zero-padding shortcuts (A), He 2015 Fig. 4: plain{_d}'s parameters",
              depth=_d, shortcut="A")

# He 2015 Table 6 (CIFAR-10): 6n + 2 layers, option A shortcuts, which have no parameters; the plain
# nets have the same layers and hence the same count (Fig. 6 shows plain-20 to -56; plain110 completes it).
_CIFAR = (3, 32, 32)
_CIFAR_RESNETS = [(20, "0.27", 0.041), (32, "0.46", None), (44, "0.66", None), (56, "0.85", 0.125),
                  (110, "1.7", 0.253), (1202, "19.4", 2.829)]
for _d, _p, _g in _CIFAR_RESNETS:
    _baseline(f"resnet{_d}", "ResNet (CIFAR)", resnet_cifar, _CIFAR, 10, _printed(_p), _g,
              f"ResNet-{_d} (He 2015 Table 6: {_p}M), zero-padding shortcuts (A)", depth=_d)
for _d, _p, _g in _CIFAR_RESNETS[:-1]:
    _baseline(f"plain{_d}", "ResNet (CIFAR)", resnet_cifar, _CIFAR, 10, _printed(_p), _g,
              f"{_d}-layer plain net (He 2015 Fig. 6): resnet{_d} without shortcuts", depth=_d, residual=False)

# Huang 2016: p_L = 0.5, linear decay. DenseNet's Table 2 prints 10.2M for ResNet-1202 with stochastic
# depth, but a 1202-layer CIFAR ResNet has He 2015's 19.4M. The authors' code as it made the paper's numbers
# (yueatsprograms/Stochastic_Depth at 86b5cddd97841d2586ce0047f476eba0568efc95, the camera-ready code):
# fan-in He initialisation (ResidualDrop.lua:19,25, main.lua:63: nninit.kaiming, gain 'relu'), and a
# shortcut that subsamples (ResidualDrop.lua:32, a 1x1 average pool of stride 2) and zero-pads the new maps
# (:36). The 2x2 average pool (`downsample="avgpool"`) is the later fix 8389752 (2017-02-11), after the
# paper and after DenseNet's Table 2. SVHN: README.md:43 `-N 25`, a 6 * 25 + 2 = 152-layer network.
# The constant-depth baseline ("ResNet (reported by [13])") is the same code with deathRate 0 (README.md:36).
_SD_CODE = dict(init="fan_in", downsample="subsample")
# No paper prints the 152-layer network's count or FLOPs: registered without a published number.
for _d, _p, _g in [(110, "1.7", 0.253), (152, None, None), (1202, "19.4", 2.829)]:
    _baseline(f"resnet{_d}_stochdepth", "ResNet with stochastic depth (CIFAR)", resnet_cifar, _CIFAR, 10,
              _p and _printed(_p), _g, f"ResNet-{_d} with stochastic depth (Huang 2016), p_L = 0.5"
              + (" (its SVHN network)" if _d == 152 else ""), depth=_d, stochastic_depth=0.5, **_SD_CODE)
for _d, _p, _g in [(110, "1.7", 0.253), (152, None, None)]:
    _baseline(f"resnet{_d}_constdepth", "ResNet with stochastic depth (CIFAR)", resnet_cifar, _CIFAR, 10,
              _p and _printed(_p), _g, f"ResNet-{_d} of the stochastic-depth code at constant depth (Huang 2016's "
              f"baseline{', SVHN' if _d == 152 else ''})", depth=_d, **_SD_CODE)

# He 2016 (Identity Mappings) Tables 2-4 and DenseNet's Table 2. ResNet-1001 built by the paper's rules
# has 10.33M parameters (SPEC.md); the paper prints 10.2M.
_FAMILY = "Pre-activation ResNet (CIFAR)"
_baseline("preact_resnet110", _FAMILY, preact_resnet_cifar, _CIFAR, 10, _printed("1.7"), None,
          "pre-activation ResNet-110 (He 2016), basic units", depth=110, bottleneck=False)
_baseline("preact_resnet164", _FAMILY, preact_resnet_cifar, _CIFAR, 10, _printed("1.7"), 0.248,
          "pre-activation ResNet-164 (He 2016), bottleneck units", depth=164)
_baseline("preact_resnet1001", _FAMILY, preact_resnet_cifar, _CIFAR, 10, _printed("10.33"), 1.491,
          "pre-activation ResNet-1001 (He 2016 prints 10.2M), bottleneck units", depth=1001)

# Zagoruyko and Komodakis 2016, as DenseNet's Table 2 cites them: WRN-16-4 "with dropout" on SVHN, at the
# rate of the authors' SVHN script (0.4); `drop_rate` sets it for any of them (0.3 in their CIFAR runs).
_FAMILY = "Wide ResNet (CIFAR)"
for _d, _k, _p, _g, _drop in [(16, 4, "2.7", None, 0.4), (16, 8, "11.0", 1.548, 0.0), (28, 10, "36.5", 5.243, 0.0)]:
    _baseline(f"wrn_{_d}_{_k}", _FAMILY, wide_resnet, _CIFAR, 10, _printed(_p), _g,
              f"WRN-{_d}-{_k} ({_p}M)" + (f", dropout {_drop} (SVHN)" if _drop else ""),
              depth=_d, widen_factor=_k, drop_rate=_drop)

# Xie 2017: ImageNet (Table 1; torchvision's resnext50_32x4d) and CIFAR-10. ResNeXt-29 16x64d has
# 68,155,210 parameters, which the paper prints, truncated, as 68.1M.
_baseline("resnext50_32x4d", "ResNeXt (ImageNet)", resnext_imagenet, _IMAGENET, 1000, 25_028_904, 4.230,
          "ResNeXt-50 (32x4d), Xie 2017 Table 1: 25.0M", depth=50, cardinality=32, bottleneck_width=4)
_baseline("resnext101_32x4d", "ResNeXt (ImageNet)", resnext_imagenet, _IMAGENET, 1000, _printed("44.2"), None,
          "ResNeXt-101 (32x4d), Xie 2017: 44.2M", depth=101, cardinality=32, bottleneck_width=4)

# Xie 2017 Table 3: cardinality against bottleneck width at preserved complexity (~4.1 / ~7.8 GFLOPs);
# the paper prints no parameter counts for these (the 1x64d rows are resnet50/101, 32x4d the entries above).
for _d in (50, 101):
    for _c, _w in [(2, 40), (4, 24), (8, 14)]:
        _baseline(f"resnext{_d}_{_c}x{_w}d", "ResNeXt (ImageNet)", resnext_imagenet, _IMAGENET, 1000, None, None,
                  f"ResNeXt-{_d} ({_c}x{_w}d), Xie 2017 Table 3 ablation", depth=_d, cardinality=_c,
                  bottleneck_width=_w)
_baseline("resnext29_8x64d", "ResNeXt (CIFAR)", resnext_cifar, _CIFAR, 10, _printed("34.4"), None,
          "ResNeXt-29 (8x64d) on CIFAR, Xie 2017: 34.4M", depth=29, cardinality=8, bottleneck_width=64)
_baseline("resnext29_16x64d", "ResNeXt (CIFAR)", resnext_cifar, _CIFAR, 10, _printed("68.1", truncated=True),
          None, "ResNeXt-29 (16x64d) on CIFAR, Xie 2017: 68.1M", depth=29, cardinality=16, bottleneck_width=64)
