"""ZCA whitening as the Wide ResNet authors whitened CIFAR: global contrast normalisation of every image,
then ZCA with a bias on the covariance, fitted on the training images only.

szagoruyko/wide-residual-networks README.md (commit 1b1ab5e50b4dbbae179ad5e01d90e2117c5f82d5, lines 61-66)
trains on `cifar10_whitened.t7` (train.lua line 18, its default `dataset`), "whitened (using pylearn2)"
with lisa-lab/pylearn2's pylearn2/scripts/datasets/make_cifar10_gcn_whitened.py. At pylearn2 commit
30437ee5621eddcfb3ee7ef2fdb12d3591367a85 (2016-04-03, the last before the WRN paper):
- make_cifar10_gcn_whitened.py:19,58  CIFAR10(which_set=..., gcn=55.): train and test images each
  contrast-normalised on their own, as float32 pixels in [0, 255] (datasets/cifar10.py:110, 144);
- expr/preprocessing.py:16-93  global_contrast_normalize(X, scale=55.) with its defaults (subtract_mean,
  use_std=False, sqrt_bias=0, min_divisor=1e-8): x <- (x - mean(x)) / (||x - mean(x)||_2 / 55), a
  divisor below 1e-8 taken as 1;
- make_cifar10_gcn_whitened.py:50-51,61  preprocessing.ZCA() fitted on train (can_fit=True), applied to
  test (can_fit=False);
- datasets/preprocessing.py:1201  ZCA's filter_bias=0.1 (the epsilon), :1414-1455  mean_ over the
  training images, covariance = X^T X / n + 0.1 I (X centred), eigh, P = V diag(1 / sqrt(eig)) V^T,
  :1478  applied as (x - mean_) P.

train.lua (1b1ab5e, lines 86-135) then flips and randomly crops the stored whitened images (reflection
padding of 4 in scripts/train_cifar.sh): the augmentation acts on whitened data, as `Batches` does here
(normalise, then augment). The whitened training covariance is P C P = I - 0.1 P^2: the identity, less
the bias's shrinkage of the directions of small variance.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

GCN_SCALE = 55.0  # make_cifar10_gcn_whitened.py:19 `gcn=55.`
GCN_MIN_DIVISOR = 1e-8  # expr/preprocessing.py:17 `min_divisor=1e-8`
ZCA_EPSILON = 0.1  # datasets/preprocessing.py:1201 `filter_bias=0.1`, added to the covariance's diagonal


def global_contrast_normalize(x: torch.Tensor, scale: float = GCN_SCALE) -> torch.Tensor:
    """pylearn2's global_contrast_normalize(X, scale) of rows X (N, D) of pixels in [0, 255]: each row
    centred and scaled to L2 norm `scale` (a norm below 1e-8 * scale left unscaled)."""
    x = x - x.mean(1, keepdim=True)
    norm = x.pow(2).sum(1, keepdim=True).sqrt() / scale
    return x / torch.where(norm < GCN_MIN_DIVISOR, torch.ones_like(norm), norm)


@dataclass(eq=False)
class ZCA:
    """GCN then ZCA whitening of uint8 images (B, C, H, W) -> float32, as pylearn2's ZCA().

    `mean` (D,) and `matrix` P (D, D) are float32 over the flattened C*H*W pixels, in the images' own
    (C, H, W) order; `epsilon` the bias the covariance was fitted with."""

    mean: torch.Tensor
    matrix: torch.Tensor
    shape: tuple[int, int, int]
    epsilon: float = ZCA_EPSILON
    gcn_scale: float = GCN_SCALE
    _on: dict = field(default_factory=dict, repr=False)  # mean and P cached per device

    kind = "zca"

    def __post_init__(self) -> None:
        d = self.shape[0] * self.shape[1] * self.shape[2]
        if self.mean.shape != (d,) or self.matrix.shape != (d, d):
            raise ValueError(f"ZCA: mean {tuple(self.mean.shape)} and matrix {tuple(self.matrix.shape)} do not "
                             f"fit images of shape {self.shape} ({d} pixels)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> whitened float32 (B, C, H, W)."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"ZCA was fitted on images of shape {self.shape}, got {tuple(x.shape[1:])}")
        if x.device not in self._on:
            self._on[x.device] = (self.mean.to(x.device), self.matrix.to(x.device))
        mean, p = self._on[x.device]
        flat = global_contrast_normalize(x.reshape(len(x), -1).float(), self.gcn_scale)
        return ((flat - mean) @ p).reshape(x.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.contiguous(), "matrix": self.matrix.contiguous()}

    def metadata(self) -> dict[str, str]:
        return {"epsilon": repr(self.epsilon), "gcn_scale": repr(self.gcn_scale),
                "shape": ",".join(map(str, self.shape))}


def fit_zca(images: torch.Tensor, epsilon: float = ZCA_EPSILON, chunk: int = 2048, device="cpu") -> ZCA:
    """The ZCA of uint8 training images (N, C, H, W): GCN per image, then the training mean and
    P = (C + epsilon I)^(-1/2), computed in float64 (on `device`, chunk by chunk) and kept in float32."""
    if images.dim() != 4 or len(images) < 2:
        raise ValueError(f"ZCA needs at least two images (N, C, H, W), got shape {tuple(images.shape)}")
    if not epsilon > 0:
        raise ValueError(f"ZCA epsilon must be > 0, got {epsilon}")
    n, d = len(images), images[0].numel()
    s = torch.zeros(d, dtype=torch.float64, device=device)
    for i in range(0, n, chunk):
        s += global_contrast_normalize(images[i:i + chunk].reshape(-1, d).to(device, torch.float64)).sum(0)
    mean = s / n
    cov = torch.zeros(d, d, dtype=torch.float64, device=device)
    for i in range(0, n, chunk):
        x = global_contrast_normalize(images[i:i + chunk].reshape(-1, d).to(device, torch.float64)) - mean
        cov += x.T @ x
    cov = cov / n + epsilon * torch.eye(d, dtype=torch.float64, device=device)
    eigs, eigv = torch.linalg.eigh(cov)
    p = (eigv * eigs.rsqrt()) @ eigv.T
    c, h, w = images.shape[1:]
    return ZCA(mean.float().cpu(), p.float().cpu(), (int(c), int(h), int(w)), float(epsilon))


__all__ = ["GCN_SCALE", "ZCA", "ZCA_EPSILON", "fit_zca", "global_contrast_normalize"]
