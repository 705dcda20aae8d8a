"""Every private PyTorch API the package uses, reached only through here, each with a fallback.

The fast paths lean on a few of PyTorch's private operators and attributes (measured on torch 2.14;
a later release may rename, remove or change any of them). Each is an entry of `ENTRIES`: where it
lives, what needs it and what happens without it. An entry is looked up once, on first need; when it
is missing, or fails its check or its first use, the fast path that needs it is turned off for the
rest of the process, with one warning (`PrivateTorchAPIWarning`), and the result is still the one
the reference path computes:

- kernels of the fused dense block's forward and backward passes (`native_batch_norm_out`,
  `native_batch_norm_backward`, `convolution_backward`, `threshold_backward`, `linear_pointwise`):
  the call is made with public operations instead (`call`, with the caller's fallback: autograd of
  F.batch_norm and F.conv2d, masked_fill_, torch.mm). Also when the private kernel raises at its
  first use: that call is redone with the fallback, so the step in progress is not lost;
- what the fused block cannot do without (`tensor_version`: an output modified in place before
  backward is refused, not silently wrong; `graph_task_id`: a second backward pass over the same
  graph starts afresh): dense blocks take the reference path (fused.policy.supported), and the
  eval-mode path too without the version counter (`_inference.block_applies`);
- `global_forward_hooks`: without a way to see hooks registered for every module, the eval-mode
  path (which calls no module) is off;
- `python_dispatch`, `pytree`, `storage_key` (analysis.memory): activation memory is counted at the
  level of torch functions instead (public TorchFunctionMode: within a few percent, the tensors an
  operator allocates inside itself are not seen), with a flattening of lists, tuples and dicts, and
  storages told apart by their Python object.

`disabled(name, ...)` forces fallbacks for the duration of a context and restores every entry's
state after it (tests/test_torch_compat.py runs the model under each one against the reference path).
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
import warnings
from typing import Any, Callable

import torch


class PrivateTorchAPIWarning(RuntimeWarning):
    """A private PyTorch API is missing or failed: the fast path that needs it is off (warned once)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One private API: `locate()` returns it (and raises when it is missing); `check(api)`, when
    given, tries it once before its first use (raising when it does not work)."""

    name: str
    api: str
    needed_by: str
    fallback: str
    locate: Callable[[], Any]
    check: Callable[[Any], None] | None = None


def _aten(name: str, overload: str = "default") -> Callable[[], Any]:
    return lambda: getattr(getattr(torch.ops.aten, name), overload)


def _graph_task_id_check(fn) -> None:
    if not isinstance(fn(), int):  # -1 outside a backward pass
        raise TypeError("torch._C._current_graph_task_id() did not return an int")


def _tensor_version() -> Callable[[torch.Tensor], int]:
    torch.Tensor._version  # noqa: B018  (AttributeError when PyTorch has no such attribute)
    return operator.attrgetter("_version")


def _linear_pointwise():
    return torch.ops.mkldnn._linear_pointwise


def _linear_pointwise_check(linear) -> None:
    """Whether this PyTorch's oneDNN product (a private operator, measured on torch 2.14 only) gives
    torch.mm's result on operands laid out as the fused backward pass passes them (a contiguous
    weight for dL/dz, a transposed one for dL/dW); checked once, on small matrices."""
    gen = torch.Generator().manual_seed(0)  # not the global generator: this check runs inside a training
    # step (the first backward pass), and drawing from torch's default generator there would shift that
    # step's and every later dropout mask: a resumed run would no longer end bitwise where an uninterrupted one does
    with torch.no_grad():
        # (c, o), (N, o), (c, N)
        w_t, g2, z = (torch.randn(*shape, generator=gen, device="cpu") for shape in ((5, 3), (11, 3), (5, 11)))
        if not (torch.allclose(linear(w_t, g2, None, "none", [], ""), w_t @ g2.t(), atol=1e-5)
                and torch.allclose(linear(z, g2.t(), None, "none", [], ""), z @ g2, atol=1e-5)):
            raise ValueError("its products differ from torch.mm's")


def _global_forward_hooks():
    module = torch.nn.modules.module
    module._global_forward_hooks, module._global_forward_pre_hooks  # noqa: B018  (AttributeError if missing)
    return module


def _python_dispatch():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def _pytree():
    from torch.utils._pytree import tree_flatten

    return lambda tree: tree_flatten(tree)[0]


def _storage_key():
    torch.UntypedStorage._cdata  # noqa: B018
    return operator.attrgetter("_cdata")


_FUSED = "the fused dense block (models/fused)"
ENTRIES: dict[str, Entry] = {e.name: e for e in (
    Entry("graph_task_id", "torch._C._current_graph_task_id", _FUSED + ", to tell backward passes apart",
          "dense blocks take the reference path while autograd records them",
          lambda: torch._C._current_graph_task_id, _graph_task_id_check),
    Entry("tensor_version", "Tensor._version", _FUSED + " and the eval-mode path, to see in-place changes",
          "dense blocks take the reference path", _tensor_version),
    Entry("native_batch_norm_out", "torch.ops.aten.native_batch_norm.out", _FUSED + " (its BN-ReLU)",
          "F.batch_norm is used instead", _aten("native_batch_norm", "out")),
    Entry("native_batch_norm_backward", "torch.ops.aten.native_batch_norm_backward", _FUSED + " (backward)",
          "autograd of F.batch_norm is used instead", _aten("native_batch_norm_backward")),
    Entry("convolution_backward", "torch.ops.aten.convolution_backward", _FUSED + " (backward of 3x3 convolutions)",
          "autograd of F.conv2d is used instead", _aten("convolution_backward")),
    Entry("threshold_backward", "torch.ops.aten.threshold_backward.grad_input", _FUSED + " (backward of ReLU)",
          "masked_fill_ is used instead", _aten("threshold_backward", "grad_input")),
    Entry("linear_pointwise", "torch.ops.mkldnn._linear_pointwise", _FUSED + " (oneDNN 1x1 backward products)",
          "torch.mm is used instead", _linear_pointwise, _linear_pointwise_check),
    Entry("global_forward_hooks", "torch.nn.modules.module._global_forward_hooks/_global_forward_pre_hooks",
          "the eval-mode dense block (models/_inference.py), to see hooks registered for every module",
          "the eval-mode path is off", _global_forward_hooks),
    Entry("python_dispatch", "torch.utils._python_dispatch.TorchDispatchMode",
          "analysis.memory, to see every tensor an operator allocates",
          "tensors are counted at the level of torch functions (approximate)", _python_dispatch),
    Entry("pytree", "torch.utils._pytree.tree_flatten", "analysis.memory, to find the tensors an operator returns",
          "lists, tuples and dicts are flattened here", _pytree),
    Entry("storage_key", "UntypedStorage._cdata", "analysis.memory, to count each storage once",
          "storages are told apart by their Python object", _storage_key),
)}


class _Status:
    """Where an entry stands: `state` "unresolved" (not looked up yet), "ready" (found, not yet used
    through `call`), "proven" (used through `call` once without error) or "off" (its fallback runs);
    `api` the API itself (None when off); `warned` whether its warning was given."""

    __slots__ = ("state", "api", "warned")

    def __init__(self, state: str = "unresolved", api: Any = None, warned: bool = False):
        self.state, self.api, self.warned = state, api, warned

    def copy(self) -> _Status:
        return _Status(self.state, self.api, self.warned)


# process-wide, as the APIs are; changed only here, and by `disabled`, which puts it back
_status: dict[str, _Status] = {name: _Status() for name in ENTRIES}
_forced: dict[str, str] = {}  # name -> "missing" or "raising", within `disabled`


def _warn(name: str, problem: str) -> None:
    s = _status[name]
    if s.warned:
        return
    s.warned = True
    e = ENTRIES[name]
    warnings.warn(f"densenet: {e.api} {problem} (torch {torch.__version__}); it serves {e.needed_by}: "
                  f"{e.fallback} (the same results, more slowly). This warning is given once.",
                  PrivateTorchAPIWarning, stacklevel=4)


def _raiser(name: str) -> Callable[..., Any]:
    def fail(*args, **kwargs):
        raise RuntimeError(f"{ENTRIES[name].api} made to fail (_torch_compat.disabled(..., raising=True))")

    return fail


def _resolve(name: str) -> Any:
    s, e = _status[name], ENTRIES[name]
    try:
        if _forced.get(name) == "missing":
            raise AttributeError(f"{e.api} made missing (_torch_compat.disabled)")
        api = _raiser(name) if _forced.get(name) == "raising" else e.locate()
        if e.check is not None:
            e.check(api)
    except Exception as exc:  # missing (AttributeError, ImportError) or not working: the fallback
        s.state, s.api = "off", None
        _warn(name, f"is unavailable ({type(exc).__name__}: {exc})")
        return None
    s.state, s.api = "ready", api
    return api


def get(name: str) -> Any:
    """The API of entry `name`, looked up (and checked) on first need; None when it is off."""
    s = _status[name]
    if s.state == "unresolved":
        return _resolve(name)
    return s.api


def available(name: str) -> bool:
    """Whether entry `name` is there to be used (looked up on first need; warns once when it is not)."""
    return get(name) is not None


def failed(name: str, exc: BaseException) -> None:
    """Entry `name` raised at a use: off from now on, with its warning."""
    s = _status[name]
    s.state, s.api = "off", None
    _warn(name, f"raised {type(exc).__name__}: {exc}")


def call(name: str, fallback: Callable[..., Any], *args, **kwargs) -> Any:
    """The private API `name` called with these arguments, or `fallback` with the same ones where it
    is off. When its first call raises (anything but running out of memory), it is turned off and
    this call is redone by the fallback: the fallbacks recompute from the arguments, and the in-place
    operator among them (threshold_backward, whose gradient is also its output) gives the same
    result applied again."""
    s = _status[name]
    if s.state == "proven":
        return s.api(*args, **kwargs)
    api = get(name)
    if api is None:
        return fallback(*args, **kwargs)
    try:
        out = api(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        failed(name, exc)
        return fallback(*args, **kwargs)
    s.state = "proven"
    return out


@contextlib.contextmanager
def disabled(*names: str, raising: bool = False):
    """Within this context the named entries behave as if the private API were missing (or, with
    raising=True, as if it raised at its first use or check), so that their fallbacks run, each with
    its one warning. Every entry's state (looked up or not, warned or not) is put back afterwards:
    for tests. Process-wide: do not run the model in other threads meanwhile."""
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        raise KeyError(f"no such entry: {', '.join(unknown)} (known: {', '.join(ENTRIES)})")
    saved = {n: _status[n].copy() for n in names}
    saved_forced = dict(_forced)
    try:
        for n in names:
            _status[n] = _Status()
            _forced[n] = "raising" if raising else "missing"
        yield
    finally:
        _forced.clear()
        _forced.update(saved_forced)
        _status.update(saved)


# --- the accessors the package uses for the entries that are not kernels ----------------------------

def graph_task_id() -> int:
    """Autograd's id of the backward pass running now (-1 outside one, and where unavailable: every
    pass counts as one; the fused path is then off where autograd records it)."""
    return call("graph_task_id", _no_task_id)


def _no_task_id() -> int:
    return -1


def tensor_version(t: torch.Tensor) -> int | None:
    """How often t was modified in place: 0 for an inference tensor (which cannot be, and has no
    counter); None where PyTorch's version counter is unavailable."""
    return 0 if t.is_inference() else call("tensor_version", _no_version, t)


def _no_version(t: torch.Tensor) -> None:
    return None


def global_forward_hooks_registered() -> bool | None:
    """Whether any forward (pre-)hook is registered for every module (register_module_forward_hook);
    None where that cannot be known."""
    module = get("global_forward_hooks")
    if module is None:
        return None
    try:
        return bool(module._global_forward_hooks or module._global_forward_pre_hooks)
    except Exception as exc:  # (the check at lookup found both; only a later change of PyTorch's gets here)
        failed("global_forward_hooks", exc)
        return None


def tree_leaves(tree) -> list:
    """The leaves of a nest of lists, tuples and dicts (an operator's outputs)."""
    return call("pytree", _leaves, tree)


def _leaves(tree) -> list:
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    if isinstance(tree, dict):
        return [leaf for item in tree.values() for leaf in _leaves(item)]
    return [tree]


def storage_key(storage) -> int:
    """One key per storage, the same for all of its views, while it lives."""
    return call("storage_key", id, storage)
