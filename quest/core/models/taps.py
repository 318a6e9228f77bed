"""Feature taps: capture the outputs of named modules with forward hooks."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from quest.infra.errors import QuestError

# torch's forward-hook signature: (module, inputs, output) -> None
_Hook = Callable[[nn.Module, tuple[object, ...], object], None]


def _arch_of(model: nn.Module) -> str:
    """Return the zoo name build_model stored on the model, or a placeholder."""
    arch = getattr(model, "quest_arch", None)
    return arch if isinstance(arch, str) else "ARCH"


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called `name` (as in named_modules) or raise a QuestError."""
    modules = dict(model.named_modules())
    # '' is the model itself; its output is the logits, not a feature map
    if name and name in modules:
        return modules[name]
    candidates = [n for n in modules if n]
    close = difflib.get_close_matches(str(name), candidates, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise QuestError(
        f"unknown layer {name!r} in {type(model).__name__}{hint}: "
        f"run `quest models --layers {_arch_of(model)}` to list them"
    )


class FeatureTap:
    """Forward hooks on named modules; after a forward pass `.outputs[name]` holds each output.

    The stored tensors are the modules' own outputs, still attached to the autograd graph, so a
    student's tapped features can be trained through. A module that runs more than once per
    forward keeps its last output. Use as a context manager, or call `.remove()` when done.
    A later in-place op on a stored output raises on access (not detectable under
    torch.inference_mode); `clone=True` stores copies instead.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str] | str, clone: bool = False) -> None:
        names = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
        if not names:
            raise QuestError("FeatureTap needs at least one layer name (check the layer setting)")
        # resolve everything before registering anything, so a bad name leaves no hooks behind
        targets = {n: resolve_layer(model, n) for n in names}
        self.layers: tuple[str, ...] = tuple(names)
        self.clone = clone
        self._outputs: dict[str, Tensor] = {}
        self._versions: dict[str, int | None] = {}
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._make_hook(n)) for n, module in targets.items()
        ]

    def _make_hook(self, name: str) -> _Hook:
        """Return a forward hook that stores the module's output under `name`."""

        def hook(_module: nn.Module, _inputs: tuple[object, ...], output: object) -> None:
            if not isinstance(output, Tensor):
                raise QuestError(
                    f"layer {name!r} returns {type(output).__name__}, not a tensor: "
                    "tap a module that returns a single tensor"
                )
            if self.clone:
                output = output.clone()
            self._outputs[name] = output
            # version counters reveal a later in-place op (e.g. `out += x`) on a stored tensor
            self._versions[name] = None if output.is_inference() else output._version

        return hook

    @property
    def outputs(self) -> dict[str, Tensor]:
        """Return the captured outputs of the last forward, checking none was changed in place."""
        for name, tensor in self._outputs.items():
            version = self._versions.get(name)
            if version is not None and tensor._version != version:
                raise QuestError(
                    f"the output of layer {name!r} was modified in place after it was tapped: "
                    "tap another layer or create the FeatureTap with clone=True"
                )
        return dict(self._outputs)

    def __getitem__(self, name: str) -> Tensor:
        """Return the captured output of one layer."""
        outputs = self.outputs
        if name not in outputs:
            if name in self.layers:
                raise QuestError(
                    f"layer {name!r} has produced no output yet: run a forward pass first"
                )
            raise QuestError(
                f"layer {name!r} is not tapped: choose one of {', '.join(self.layers)}"
            )
        return outputs[name]

    def clear(self) -> None:
        """Drop the captured outputs (and the graphs they keep alive)."""
        self._outputs.clear()
        self._versions.clear()

    def remove(self) -> None:
        """Remove the hooks and drop captured outputs; safe to call more than once."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureTap:
        """Return self; the hooks are removed on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Remove the hooks."""
        self.remove()


def dummy_forward(model: nn.Module, input_size: tuple[int, int, int]) -> None:
    """Run one zero image through `model` in eval mode without grad, restoring its mode after."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        # eval: BN in train mode rejects a batch of one whose maps are 1x1
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)


def tap_shapes(model: nn.Module, layers: list[str], input_size: tuple[int, ...]
               ) -> list[tuple[int, ...]]:
    """C x H x W (without batch) of each named layer's output, from one `dummy_forward`."""
    with FeatureTap(model, layers) as tap:
        dummy_forward(model, tuple(input_size))  # type: ignore[arg-type]
        return [tuple(int(v) for v in tap.outputs[name].shape[1:]) for name in layers]


def list_layers(
    model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)
) -> list[tuple[str, str, tuple[int, ...]]]:
    """Return (name, module type, output shape without batch) per tensor-producing module.

    Modules appear in the order they are first entered, so a container precedes its children; a
    module run several times reports the shape of its last call, which a FeatureTap would hold.
    """
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    kinds: dict[str, str] = {}

    def make_pre_hook(name: str) -> Callable[[nn.Module, tuple[object, ...]], None]:
        """Return a pre-hook that records when module `name` first starts."""

        def pre_hook(module: nn.Module, _inputs: tuple[object, ...]) -> None:
            if name not in kinds:
                order.append(name)
                kinds[name] = type(module).__name__

        return pre_hook

    def make_hook(name: str) -> _Hook:
        """Return a hook that records the output shape of module `name`."""

        def hook(_module: nn.Module, _inputs: tuple[object, ...], output: object) -> None:
            if isinstance(output, Tensor):
                shapes[name] = tuple(output.shape[1:])

        return hook

    handles: list[RemovableHandle] = []
    for n, m in model.named_modules():
        if n:
            handles.append(m.register_forward_pre_hook(make_pre_hook(n)))
            handles.append(m.register_forward_hook(make_hook(n)))
    try:
        dummy_forward(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return [(n, kinds[n], shapes[n]) for n in order if n in shapes]
