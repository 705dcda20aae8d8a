"""The eval-mode path (models/_inference.py): equal to the reference path, taken exactly when it should be."""
from __future__ import annotations

import copy

import pytest
import torch

import densenet
from densenet.models import _inference
from densenet.models.densenet import DenseNet, DenseNetConfig


def calibrated(cfg: DenseNetConfig, size: int) -> DenseNet:
    """A small network whose BN running statistics are those of real activations (not 0 and 1)."""
    m = DenseNet(cfg)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None  # cumulative average
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(4, cfg.in_channels, size, size))
    return m.eval()


def reference(m: DenseNet) -> DenseNet:
    ref = copy.deepcopy(m)
    for mod in ref.modules():
        if hasattr(mod, "fused"):
            mod.fused = False
    return ref


def spy(monkeypatch) -> list:
    calls = []
    real = _inference.dense_block_forward
    monkeypatch.setattr(_inference, "dense_block_forward", lambda *a: calls.append(1) or real(*a))
    return calls


CONFIGS = {
    "bc": (DenseNetConfig(growth_rate=6, block_config=(3, 4, 2), num_classes=7), 11),  # odd sizes: pooling floors
    "plain": (DenseNetConfig(growth_rate=5, block_config=(2, 3), bottleneck=False, compression=1.0), 8),
    "imagenet": (DenseNetConfig(growth_rate=4, block_config=(2, 2, 2, 2), stem="imagenet", num_init_features=8,
                                num_classes=5), 64),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("batch", [1, 3])
def test_eval_path_equals_the_reference_path(name, batch, monkeypatch):
    cfg, size = CONFIGS[name]
    m = calibrated(cfg, size)
    ref = reference(m)
    x = torch.randn(batch, cfg.in_channels, size, size)
    calls = spy(monkeypatch)
    with torch.no_grad():
        want = ref(x)
        got = m(x)
        assert len(calls) == len(cfg.block_config)  # the eval path ran, the reference did not
        got_cl = m(x.contiguous(memory_format=torch.channels_last))
        with torch.inference_mode():
            got_inf = m(x)
    assert want.abs().max() > 0.1
    for g in (got, got_cl, got_inf):
        torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)
    m64, x64 = m.double(), x.double()
    with torch.no_grad():
        torch.testing.assert_close(m64(x64), ref.double()(x64), atol=1e-10, rtol=1e-10)


def test_folded_weights_follow_training_and_loading(monkeypatch):
    cfg, size = CONFIGS["bc"]
    m = calibrated(cfg, size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        m(x)  # fold and cache
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.train()
    m(x).square().mean().backward()
    opt.step()  # changes weights and running statistics in place
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference(m)(x), atol=1e-4, rtol=1e-4)
        other = calibrated(cfg, size)
        m.load_state_dict(other.state_dict())
        torch.testing.assert_close(m(x), reference(other)(x), atol=1e-4, rtol=1e-4)


def test_gradients_hooks_and_training_take_the_other_paths(monkeypatch):
    cfg, size = CONFIGS["bc"]
    m = calibrated(cfg, size)
    x = torch.randn(2, 3, size, size)
    calls = spy(monkeypatch)
    out = m(x)  # eval mode with autograd (e.g. Grad-CAM, adversarial inputs): the fused path
    out.sum().backward()
    assert calls == [] and m.features.conv0.weight.grad is not None
    seen = []
    h = m.features.denseblock1.denselayer2.conv2.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        m(x)
    assert len(calls) == 2 and seen == [1]  # a hook inside block 1: its modules are called, the others fold
    calls.clear()
    h.remove()
    with torch.no_grad():
        m.train()(x)
        assert calls == []
        m.eval()(x)
        assert len(calls) == 3


def test_a_loaded_checkpoint_takes_the_eval_path(tmp_path, monkeypatch):
    from densenet.saved_model import load_model, save_model

    m = densenet.create_model("densenet_bc_100_k12", depth=16, num_classes=3)
    path = save_model(m, tmp_path / "model.safetensors", {"model_args": {"depth": 16, "num_classes": 3}})
    loaded, _ = load_model(path)  # what densenet.load, `densenet predict` and `densenet eval` call
    x = torch.randn(1, 3, 32, 32)
    calls = spy(monkeypatch)
    with torch.no_grad():  # densenet.inference.predict's forward pass
        got = loaded(x)
    assert len(calls) == 3
    torch.testing.assert_close(got, reference(m).eval()(x).detach(), atol=1e-4, rtol=1e-4)


def test_block_outputs_are_channels_last_and_the_imagenet_stem_runs_so(monkeypatch):
    """The eval-mode block buffer is pixel-major: every stage comes out as an ordinary channels_last
    tensor. The ImageNet stem converts its input in eval mode only (training keeps the caller's layout)."""
    cfg, size = CONFIGS["imagenet"]
    m = calibrated(cfg, size)
    stem_inputs = []
    m.features.conv0.register_forward_hook(lambda mod, inp, out: stem_inputs.append(inp[0]))
    calls = spy(monkeypatch)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        stages = m.forward_stages(x)
    assert len(calls) == 4  # the eval-mode path, in every block
    assert stem_inputs[-1].is_contiguous(memory_format=torch.channels_last)
    assert all(s.is_contiguous(memory_format=torch.channels_last) for s in stages[:-1])
    m.train()
    m(x)
    assert stem_inputs[-1].is_contiguous()  # training: as given


def test_changes_to_bn1_are_seen_even_through_data_and_eps():
    """BN1 is read at every call (not cached), and a BN's eps is part of the cache key of the folded
    weights: neither a write through `.data` (which bypasses the version counter) nor a new eps after a
    first eval-mode call leaves the path computing with the old values."""
    cfg, size = CONFIGS["bc"]
    m = calibrated(cfg, size)
    x = torch.randn(2, 3, size, size)
    layer = m.features.denseblock1.denselayer1
    with torch.no_grad():
        m(x)  # fold and cache
        layer.norm1.running_mean.data.add_(1.0)
        torch.testing.assert_close(m(x), reference(m)(x), atol=1e-4, rtol=1e-4)
        layer.norm1.eps = layer.norm2.eps = 0.5
        torch.testing.assert_close(m(x), reference(m)(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["bc", "imagenet"])
def test_final_features_keep_the_input_memory_format_and_empty_batches_work(name):
    cfg, size = CONFIGS[name]
    m = calibrated(cfg, size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        f = m.forward_features(x)
        assert f.is_contiguous()  # as the reference path gives it: .view(B, -1) works
        f.view(2, -1)
        assert m.forward_stages(x)[-1].is_contiguous()
        f_cl = m.forward_features(x.contiguous(memory_format=torch.channels_last))
        assert f_cl.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(f_cl, f)
        assert m(x[:0]).shape == (0, cfg.num_classes)


def test_the_stem_stays_as_given_where_the_eval_path_does_not_run():
    cfg, size = CONFIGS["imagenet"]
    m = calibrated(cfg, size)
    seen = []
    m.features.conv0.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].is_contiguous()))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference(m)(x)  # fused=False: the reference path throughout
        with densenet.models.reference_path():
            m(x)
        h = m.features.denseblock1.register_forward_hook(lambda *a: None)  # block 1 calls its modules
        m(x)
        h.remove()
        m(x)
    assert seen == [True, True, True, False]


def test_eval_after_training_passes_without_weight_updates_reads_the_new_statistics():
    """Training-mode passes that change only BN running statistics (recalibration, a forward pass
    without a step) bump no version counter of those statistics (torch's BN kernel writes them
    inside), so the eval path's folded tensors are keyed on num_batches_tracked too: eval, train
    passes, eval gives what a model that never cached anything gives."""
    import copy

    torch.manual_seed(0)
    m = densenet.create_model("densenet_bc_100_k12", depth=16, bn_momentum=1.0)
    fresh = copy.deepcopy(m)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        m.eval()(x)  # folds BN2 with the initial statistics
        m.train()(x), fresh.train()(x)
        torch.testing.assert_close(m.eval()(x), fresh.eval()(x), rtol=1e-5, atol=1e-5)


# --- The workspace: scratch memory kept from call to call (models/_inference.Workspace) ---------------

def _workspaces(m: DenseNet) -> list[dict]:
    return [blk.frozen.workspace().tensors for blk in m.modules() if hasattr(blk, "frozen")]


def test_the_workspace_is_reused_and_what_a_caller_keeps_is_never_overwritten():
    cfg, size = CONFIGS["imagenet"]
    m = calibrated(cfg, size)
    ref = reference(m)
    x1, x2, x3 = (torch.randn(b, 3, size, size) for b in (3, 2, 5))  # smaller, then larger: it grows
    with torch.inference_mode():
        y1 = m(x1)
        first = [{k: t.data_ptr() for k, t in ws.items()} for ws in _workspaces(m)]
        assert first[0].keys() == {("z", torch.float32), ("y", torch.float32), ("pooled", torch.float32),
                                   ("out", torch.float32)}  # the lent buffer came back from the transition
        assert ("out", torch.float32) not in first[-1]  # the last block's output goes to norm5: never lent
        y1_kept = y1.clone()
    with torch.no_grad():  # workspace tensors made under inference_mode are writable outside it
        y2 = m(x2)
        assert [{k: t.data_ptr() for k, t in ws.items()} for ws in _workspaces(m)] == first  # the same memory
        y3 = m(x3)
        stages = m.forward_stages(x2)
        kept = [s.clone() for s in stages]
        m(x3)
        for want, got in zip((ref(x1), ref(x2), ref(x3)), (y1, y2, y3)):
            assert torch.allclose(got, want, atol=1e-5)
        assert torch.equal(y1, y1_kept)
        # feature maps handed to the caller are not lent: a later call leaves them as they were
        assert all(torch.equal(s, k) for s, k in zip(stages, kept))


def test_a_block_output_seen_by_a_hook_is_not_lent():
    cfg, size = CONFIGS["bc"]
    m = calibrated(cfg, size)
    seen = []
    m.features.transition1.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        m(x)
        kept = seen[0].clone()
        m(torch.randn(2, 3, size, size))
    assert torch.equal(seen[0], kept)


def test_threads_have_their_own_workspace_and_release_frees_it():
    import threading

    cfg, size = CONFIGS["bc"]
    m = calibrated(cfg, size)
    ref = reference(m)
    xs = [torch.randn(4, 3, size, size) for _ in range(4)]
    with torch.no_grad():
        want = [ref(x) for x in xs]
    got, errors = {}, []

    def run(i):
        try:
            with torch.no_grad():
                for _ in range(5):
                    got[i] = m(xs[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.allclose(got[i], want[i], atol=1e-5) for i in range(4))
    with torch.no_grad():
        m(xs[0])
    assert any(_workspaces(m))
    m.release_scratch()
    assert not any(_workspaces(m))
    with torch.no_grad():
        m(xs[0])
    m.train()
    assert not any(_workspaces(m))
