"""Published results of the DenseNet paper (Huang et al., CVPR 2017), as SPEC.md gives them: the
numbers our own runs are drawn and tabulated beside: all of Table 2 (the DenseNets, the baselines and
the other methods), Table 1, and the ImageNet ResNets of Figure 3."""
from __future__ import annotations

from dataclasses import dataclass, field

# Table 2: error rates (%) on CIFAR and SVHN; "+" = standard augmentation. None: not reported.
TABLE2_SETTINGS = ("C10", "C10+", "C100", "C100+", "SVHN")
TABLE2: dict[str, dict[str, float | None]] = {
    "densenet_40_k12": {"C10": 7.00, "C10+": 5.24, "C100": 27.55, "C100+": 24.42, "SVHN": 1.79},
    "densenet_100_k12": {"C10": 5.77, "C10+": 4.10, "C100": 23.79, "C100+": 20.20, "SVHN": 1.67},
    "densenet_100_k24": {"C10": 5.83, "C10+": 3.74, "C100": 23.42, "C100+": 19.25, "SVHN": 1.59},
    "densenet_bc_100_k12": {"C10": 5.92, "C10+": 4.51, "C100": 24.15, "C100+": 22.27, "SVHN": 1.76},
    "densenet_bc_250_k24": {"C10": 5.19, "C10+": 3.62, "C100": 19.64, "C100+": 17.60, "SVHN": 1.74},
    "densenet_bc_190_k40": {"C10": None, "C10+": 3.46, "C100": None, "C100+": 17.18, "SVHN": None},
}

# Table 1 / Table 3: ImageNet validation error (%), single 224 centre crop and 10-crop.
TABLE1: dict[str, dict[str, float]] = {
    "densenet121": {"top1": 25.02, "top5": 7.71, "top1_10crop": 23.61, "top5_10crop": 6.66},
    "densenet169": {"top1": 23.80, "top5": 6.85, "top1_10crop": 22.08, "top5_10crop": 5.92},
    "densenet201": {"top1": 22.58, "top5": 6.34, "top1_10crop": 21.46, "top5_10crop": 5.54},
    "densenet264": {"top1": 22.15, "top5": 6.12, "top1_10crop": 20.80, "top5_10crop": 5.29},
}

# How each Table 2 setting is trained: dataset and augmentation ("none" brings dropout 0.2).
SETTING_DATA = {"C10": ("cifar10", "none"), "C10+": ("cifar10", "cifar"), "C100": ("cifar100", "none"),
                "C100+": ("cifar100", "cifar"), "SVHN": ("svhn", "none")}


# --- Table 2, every row: the baselines and the other methods ---------------------------------------------

@dataclass(frozen=True)
class PublishedRow:
    """One row of Table 2 as printed: errors (%) by setting, "*" marks (results the DenseNet authors ran)."""

    key: str  # the row's name in `reproduce` tables
    label: str  # as the paper prints it
    depth: int | None
    params: str | None  # as printed, e.g. "1.7M"
    errors: dict[str, float]  # setting -> error; settings left out are "-" in the paper
    model: str | None = None  # the registered network trained for this row (None: not in this package)
    recipe: str | None = None  # the recipe name that reproduces it (densenet.recipes), None: the model's default
    starred: tuple[str, ...] = ()  # settings marked "*": run by the DenseNet authors
    source: str = ""
    notes: str = ""
    model_args: dict = field(default_factory=dict)
    setting_models: dict[str, str] = field(default_factory=dict)  # setting -> the network trained there
    #                                                               instead of `model` (SD's 152 layers on SVHN)

    def model_for(self, setting: str) -> str | None:
        """The registered network this row trains in `setting`."""
        return self.setting_models.get(setting, self.model)


_DENSENET_PARAMS = {"densenet_40_k12": "1.0M", "densenet_100_k12": "7.0M", "densenet_100_k24": "27.2M",
                    "densenet_bc_100_k12": "0.8M", "densenet_bc_250_k24": "15.3M", "densenet_bc_190_k40": "25.6M"}

TABLE2_ROWS: tuple[PublishedRow, ...] = (
    PublishedRow("nin", "Network in Network [22]", None, None,
                 {"C10": 10.41, "C10+": 8.81, "C100": 35.68, "SVHN": 2.35}, source="Lin et al. 2014"),
    PublishedRow("all_cnn", "All-CNN [32]", None, None, {"C10": 9.08, "C10+": 7.25, "C100+": 33.71},
                 source="Springenberg et al. 2015"),
    PublishedRow("dsn", "Deeply Supervised Net [20]", None, None,
                 {"C10": 9.69, "C10+": 7.97, "C100+": 34.57, "SVHN": 1.92}, source="Lee et al. 2015"),
    PublishedRow("highway", "Highway Network [34]", None, None, {"C10+": 7.72, "C100+": 32.39},
                 source="Srivastava et al. 2015"),
    PublishedRow("fractalnet", "FractalNet [17]", 21, "38.6M",
                 {"C10": 10.18, "C10+": 5.22, "C100": 35.34, "C100+": 23.30, "SVHN": 2.01},
                 source="Larsson et al. 2016"),
    PublishedRow("fractalnet_droppath", "FractalNet with Dropout/Drop-path [17]", 21, "38.6M",
                 {"C10": 7.33, "C10+": 4.60, "C100": 28.20, "C100+": 23.73, "SVHN": 1.87},
                 source="Larsson et al. 2016"),
    PublishedRow("resnet110", "ResNet [11]", 110, "1.7M", {"C10+": 6.61}, model="resnet110",
                 source="He et al. 2015, Table 6 (mean of 5 runs; best 6.43)"),
    # Huang et al. 2016 trained SVHN on a 152-layer network (Stochastic_Depth README.md:43, `-N 25`), its
    # constant-depth baseline with the same code at deathRate 0 (README.md:36): both with its fan-in init
    PublishedRow("resnet110_huang2016", "ResNet (reported by [13])", 110, "1.7M",
                 {"C10": 13.63, "C10+": 6.41, "C100": 44.74, "C100+": 27.22, "SVHN": 2.01},
                 model="resnet110_constdepth", recipe="stochdepth",
                 source="Huang et al. 2016: the constant-depth baseline of stochastic depth",
                 notes="trained with the stochastic-depth recipe (500 epochs; SVHN 50), without dropping units; "
                       "SVHN on the 152-layer network",
                 setting_models={"SVHN": "resnet152_constdepth"}),
    PublishedRow("resnet110_stochdepth", "ResNet with Stochastic Depth [13]", 110, "1.7M",
                 {"C10": 11.66, "C10+": 5.23, "C100": 37.80, "C100+": 24.58, "SVHN": 1.75},
                 model="resnet110_stochdepth", source="Huang et al. 2016", notes="SVHN on the 152-layer network",
                 setting_models={"SVHN": "resnet152_stochdepth"}),
    PublishedRow("resnet1202_stochdepth", "ResNet with Stochastic Depth [13]", 1202, "10.2M", {"C10+": 4.91},
                 model="resnet1202_stochdepth", source="Huang et al. 2016",
                 notes="printed 10.2M; a 1202-layer CIFAR ResNet has 19.4M parameters"),
    PublishedRow("wrn_16_8", "Wide ResNet [42]", 16, "11.0M", {"C10+": 4.81, "C100+": 22.07}, model="wrn_16_8",
                 source="Zagoruyko and Komodakis 2016 (no dropout)"),
    PublishedRow("wrn_28_10", "Wide ResNet [42]", 28, "36.5M", {"C10+": 4.17, "C100+": 20.50}, model="wrn_28_10",
                 source="Zagoruyko and Komodakis 2016 (no dropout)"),
    PublishedRow("wrn_16_4", "Wide ResNet with Dropout [42]", 16, "2.7M", {"SVHN": 1.64}, model="wrn_16_4",
                 source="Zagoruyko and Komodakis 2016 (dropout 0.4 on SVHN)"),
    PublishedRow("preact_resnet164", "ResNet (pre-activation) [12]", 164, "1.7M",
                 {"C10": 11.26, "C10+": 5.46, "C100": 35.58, "C100+": 24.33}, model="preact_resnet164",
                 starred=("C10", "C100"), source="He et al. 2016"),
    PublishedRow("preact_resnet1001", "ResNet (pre-activation) [12]", 1001, "10.2M",
                 {"C10": 10.56, "C10+": 4.62, "C100": 33.47, "C100+": 22.71}, model="preact_resnet1001",
                 starred=("C10", "C100"), source="He et al. 2016; KaimingHe/resnet-1k-layers (batch 64: 4.62)"),
) + tuple(
    PublishedRow(name, ("DenseNet-BC" if "_bc_" in name else "DenseNet") + f" (k = {name.rsplit('_k', 1)[1]})",
                 int(name.split("_")[-2]), _DENSENET_PARAMS[name], {s: e for s, e in row.items() if e is not None}, model=name,
                 source="Huang et al. 2017")
    for name, row in TABLE2.items())

TABLE2_BY_KEY: dict[str, PublishedRow] = {r.key: r for r in TABLE2_ROWS}


def published_error(row: str, setting: str) -> float | None:
    """Table 2's error (%) for a row key (a DenseNet, a baseline, another method) and a setting."""
    r = TABLE2_BY_KEY.get(row)
    return None if r is None else r.errors.get(setting)


# --- Figure 3: the ResNets DenseNet is drawn beside (fb.resnet.torch's published models) ------------------
# facebookarchive/fb.resnet.torch pretrained/README.md, "ImageNet 1-crop error rates (224x224)" and
# "ImageNet 10-crop error rates": the models trained with its recipe (recipes.RESNET_IMAGENET).
RESNET_IMAGENET_FB: dict[str, dict[str, float]] = {
    "resnet18": {"top1": 30.43, "top5": 10.76, "top1_10crop": 28.22, "top5_10crop": 9.42},
    "resnet34": {"top1": 26.73, "top5": 8.74, "top1_10crop": 24.76, "top5_10crop": 7.35},
    "resnet50": {"top1": 24.01, "top5": 7.02, "top1_10crop": 22.24, "top5_10crop": 6.08},
    "resnet101": {"top1": 22.44, "top5": 6.21, "top1_10crop": 21.08, "top5_10crop": 5.35},
    "resnet152": {"top1": 22.16, "top5": 6.16, "top1_10crop": 20.69, "top5_10crop": 5.21},
}

# Xie et al. 2017, Table 3 (ImageNet-1K, single 224 crop, top-1 %): cardinality against width at
# preserved complexity. The 1x64d rows are ResNet-50 and -101 as Xie et al. trained them with the ResNeXt code
# (23.9 and 22.0), not fb.resnet.torch's published models (24.01 and 22.44, RESNET_IMAGENET_FB).
RESNEXT_TABLE3: dict[str, float] = {
    "resnet50": 23.9, "resnext50_2x40d": 23.0, "resnext50_4x24d": 22.6, "resnext50_8x14d": 22.3,
    "resnext50_32x4d": 22.2, "resnet101": 22.0, "resnext101_2x40d": 21.7, "resnext101_4x24d": 21.4,
    "resnext101_8x14d": 21.3, "resnext101_32x4d": 21.2,
}
