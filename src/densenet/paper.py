"""Published results of the DenseNet paper (Huang et al., CVPR 2017), as SPEC.md gives them: the
numbers our own runs are drawn and tabulated beside."""
from __future__ import annotations

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
