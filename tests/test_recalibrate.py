"""densenet.train.recalibrate: BN re-estimation (`densenet eval --recalibrate-bn`) gives the statistics
of the data with dropout off, averaged over batches, up to a number of images."""
from __future__ import annotations

import copy

import pytest
import torch

import densenet
from densenet.train.recalibrate import recalibrate_bn

from helpers import SMALL


def _no_dropout(model):
    m = copy.deepcopy(model)
    for mod in m.modules():
        if hasattr(mod, "drop_rate"):
            mod.drop_rate = 0.0
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return m


@pytest.mark.parametrize("fused", [True, False])
def test_recalibrated_statistics_are_the_datas_with_dropout_off(fused):
    """After re-estimation on one batch, eval mode computes what training mode without dropout computes
    on that batch (up to BN's unbiased running variance: n/(n-1), n = 64 * 8 * 8 values per channel)."""
    model = densenet.create_model("densenet_bc_100_k12", drop_rate=0.2, fused=fused, num_classes=5, **SMALL)
    x = torch.randn(64, 3, 8, 8) * 2 + 1
    with torch.no_grad():
        model.train()(torch.randn(64, 3, 8, 8))  # running statistics from other data, with dropout
        expected = _no_dropout(model).train()(x)
        stale = model.eval()(x)
        assert recalibrate_bn(model, [(x, None)]) == 64
        got = model(x)
    assert not model.training
    assert (stale - expected).abs().max() > 0.1  # the statistics training left are far off
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_recalibration_averages_over_batches_and_stops_at_max_images():
    model = densenet.create_model("densenet_bc_100_k12", num_classes=5, **SMALL)
    batches = [(torch.randn(16, 3, 8, 8) + i, None) for i in range(4)]
    assert recalibrate_bn(model, batches, max_images=40) == 40  # 16 + 16 + 8
    first_bn = model.features.denseblock1.denselayer1.norm1
    # batch means averaged with weights 1/3 each: (m1 + m2 + m3) / 3, where m3 is over 8 images
    with torch.no_grad():
        m = [model.features.conv0(b).mean((0, 2, 3)) for b in (batches[0][0], batches[1][0], batches[2][0][:8])]
    torch.testing.assert_close(first_bn.running_mean, sum(m) / 3, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="at least one image"):
        recalibrate_bn(model, batches, max_images=0)
