"""LoRA adapters attached to a live torch module by forward hooks, and their state dicts.

The module being trained is the host's shared diffusion model: its parameters keep their
names and objects (user LoRAs are patched into them by key), so adapters never wrap or
rename a layer. Each selected ``Linear`` / ``Conv2d`` gets a forward hook that adds
``scale * up(down(input))`` to the layer's output, with ``scale = alpha / rank``:

* Linear: ``down`` is ``Linear(in, rank)``, ``up`` is ``Linear(rank, out)``.
* Conv2d: ``down`` is a conv with the layer's kernel, stride, padding and dilation,
  ``up`` a 1x1 conv. The merged weight ``up.flatten(1) @ down.flatten(1)`` reshaped to the
  layer's weight is exactly what ComfyUI's LoRA loader adds, so a saved file reproduces the
  hooked outputs once loaded by ComfyUI.

Hooks see only the layer's output, so ComfyUI's cast/patch machinery inside the layer
(``weight_function`` lists, dtype casts) is untouched. Files are read and written by
:mod:`distill_core.safe_files`.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

AdaptedLayer = nn.Linear | nn.Conv2d  # the layer kinds a LoRA can adapt
LAYER_KINDS: dict[str, type[AdaptedLayer]] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}


class LoraTargetError(ValueError):
    """The network's layers cannot take the requested LoRA (grouped convolutions, rank too large)."""


class NoLoraLayersError(LoraTargetError):
    """No layer of the module matches the LoRA's target kinds and filter: no rank helps (not a rank problem)."""


class LoraAdapter(nn.Module):
    """The low-rank pair for one layer: ``delta(x) = alpha / rank * up(down(x))``."""

    def __init__(self, layer: AdaptedLayer, rank: int, alpha: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        self.lora_down: AdaptedLayer
        self.lora_up: AdaptedLayer
        if isinstance(layer, nn.Linear):
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False, device=device, dtype=dtype)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False, device=device, dtype=dtype)
        else:
            padding = layer.padding if isinstance(layer.padding, str) else _pair(layer.padding)
            self.lora_down = nn.Conv2d(
                layer.in_channels, rank, _pair(layer.kernel_size), stride=_pair(layer.stride), padding=padding,
                dilation=_pair(layer.dilation), bias=False, padding_mode=layer.padding_mode, device=device, dtype=dtype,
            )
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False, device=device, dtype=dtype)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: Tensor) -> Tensor:
        """The adapter's contribution to the layer output for layer input ``x``."""
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) * self.scale

    def merged_weight(self, weight: Tensor) -> Tensor:
        """``weight + scale * up @ down``: the layer's weight with this adapter folded in (one fused op).

        Exact for convolutions too, because ``down`` has the layer's kernel, stride and padding and
        ``up`` is a 1x1 convolution. ``weight`` is float32 or float64 (see :meth:`LoraSet.merged`).
        """
        up, down = (factor.weight.flatten(1).to(weight.dtype) for factor in (self.lora_up, self.lora_down))
        return torch.addmm(weight.flatten(1), up, down, alpha=self.scale).view(weight.shape)


class LoraSet:
    """All adapters attached to one module; see :func:`attach_lora`."""

    def __init__(self, root: nn.Module, adapters: dict[str, LoraAdapter]) -> None:
        self.root = root
        self.adapters = adapters
        self._enabled = True
        self._folded: set[LoraAdapter] = set()  # adapters folded into their layer's weight (see merged())
        self.output_dtypes: set[torch.dtype] = set()  # what the adapted layers compute in (float16 needs loss scaling)
        self._handles = [
            _layer(root, name).register_forward_hook(self._make_hook(adapter)) for name, adapter in adapters.items()
        ]

    def _make_hook(self, adapter: LoraAdapter) -> Callable:
        def add_lora(_layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
            self.output_dtypes.add(output.dtype)
            if not self._enabled or adapter in self._folded:
                return output
            return output + adapter.delta(args[0]).to(output.dtype)

        return add_lora

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_attached(self) -> bool:
        return bool(self._handles)

    @contextlib.contextmanager
    def enabled(self, flag: bool) -> Iterator[None]:
        """Switch every adapter on or off inside the block (off = the untouched base network)."""
        previous = self._enabled
        self._enabled = flag
        try:
            yield
        finally:
            self._enabled = previous

    @contextlib.contextmanager
    def merged(self) -> Iterator[None]:
        """Inside the block (no autograd) adapted layers run with their LoRA folded into their weight.

        The merged weight ``W + scale * up @ down`` is built right before a layer runs and dropped
        right after, so at most one layer's merged copy exists at a time, and the layer's own weight
        object is put back untouched (also when the forward raises). For passes without gradients
        (the distillation target) this replaces two low-rank passes over the activations per layer
        by one small matrix product per layer. Layers whose weight the host transforms at run time
        (ComfyUI ``weight_function`` patches, quantized weights) keep the hook: folding there would
        feed the LoRA through that transform. So do float16/bfloat16/float8 weights: rounding
        ``W + scale * up @ down`` to the weight's precision would drop a LoRA smaller than half a
        unit in the last place of ``W`` (at the start of training, all of it), while the hook adds it
        to the layer's output as the student does.
        """
        originals: dict[nn.Module, nn.Parameter] = {}

        def swap_in(adapter: LoraAdapter) -> Callable:
            def hook(layer: nn.Module, args: tuple) -> None:
                weight = layer.get_parameter("weight")  # a Parameter: see _foldable
                originals[layer] = weight
                # a plain tensor in the parameter slot: what the layer's forward reads as self.weight (torch types
                # the slot Parameter | None, and Module.__setattr__ refuses a plain tensor for a parameter's name)
                layer._parameters["weight"] = adapter.merged_weight(weight)  # type: ignore[assignment]
            return hook

        def swap_out(layer: nn.Module, args: tuple, output: Tensor) -> None:
            layer._parameters["weight"] = originals.pop(layer)

        handles = []
        for name, adapter in self.adapters.items():
            layer = _layer(self.root, name)
            if _foldable(layer):
                self._folded.add(adapter)
                handles += [layer.register_forward_pre_hook(swap_in(adapter)), layer.register_forward_hook(swap_out)]
        try:
            with torch.no_grad():
                yield
        finally:
            for handle in handles:
                handle.remove()
            for layer, weight in originals.items():
                layer._parameters["weight"] = weight
            self._folded.clear()

    def parameters(self) -> list[Tensor]:
        """Trainable tensors in a fixed order (module order, down before up), for the optimizer."""
        return [param for _, param in self.named_parameters()]

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        for name, adapter in self.adapters.items():
            yield f"{name}.lora_down.weight", adapter.lora_down.weight
            yield f"{name}.lora_up.weight", adapter.lora_up.weight

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraSet:
        """Move the adapters (e.g. after the host moved the model); build the optimizer afterwards."""
        for adapter in self.adapters.values():
            adapter.to(device=device, dtype=dtype)
        return self

    def remove(self) -> None:
        """Detach every hook: the module is left exactly as it was before :func:`attach_lora`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self.adapters)


def _foldable(layer: nn.Module) -> bool:
    """Whether a layer's forward uses its stored float32/float64 weight as it is (no run-time weight transform)."""
    weight = layer._parameters.get("weight")
    return (type(weight) is nn.Parameter and type(weight.data) is torch.Tensor
            and weight.dtype in (torch.float32, torch.float64) and not getattr(layer, "weight_function", None))


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's stored ``(h, w)`` setting, typed as its constructor takes it."""
    height, width = values
    return height, width


def _layer(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def _matrix_shape(layer: AdaptedLayer) -> tuple[int, int]:
    """``(in, out)`` of the layer's weight seen as a matrix (conv fan-in includes the kernel)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels * math.prod(layer.kernel_size), layer.out_channels


def attach_lora(
    module: nn.Module,
    rank: int,
    alpha: float | None = None,
    target: Sequence[str] = ("Linear", "Conv2d"),
    name_filter: str | Callable[[str], bool] | None = None,
    init: str = "zero-up",
    dtype: torch.dtype | None = None,
    skip_small_layers: bool = False,
) -> LoraSet:
    """Attach a LoRA adapter to every matching layer below ``module`` via forward hooks.

    ``target`` names layer kinds (``"Linear"``, ``"Conv2d"``; subclasses such as ComfyUI's
    ops count). ``name_filter`` (a regex searched in the module name, or a predicate) narrows
    the selection. ``alpha`` defaults to ``rank`` (scale 1). ``init="zero-up"`` (down random,
    up zero) leaves outputs unchanged; ``"random"`` makes both factors random. Adapters are
    float32 unless the layer is float64 or ``dtype`` says otherwise, and live on the layer's
    device. Raises :class:`NoLoraLayersError` when no layer matches at all (no rank helps), :class:`LoraTargetError`
    for a rank outside ``1..min(in, out)`` of any selected layer,
    unless ``skip_small_layers`` leaves such layers without an adapter (as diffusers' LCM-LoRA
    target list leaves out a UNet's 4-channel ``conv_in`` / ``conv_out``).
    """
    unknown = [kind for kind in target if kind not in LAYER_KINDS]
    if unknown:
        raise ValueError(f"unknown LoRA target layer kinds {unknown}; choose from {sorted(LAYER_KINDS)}")
    if init not in ("zero-up", "random"):
        raise ValueError(f"init must be 'zero-up' or 'random', got {init!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(name_filter, str):
        pattern = re.compile(name_filter)
        keep_name: Callable[[str], bool] = lambda name: pattern.search(name) is not None  # noqa: E731
    else:
        keep_name = name_filter or (lambda name: True)

    kinds = tuple(LAYER_KINDS[kind] for kind in target)
    selected: list[tuple[str, AdaptedLayer]] = [(name, layer) for name, layer in module.named_modules()
                                                if name and isinstance(layer, kinds) and keep_name(name)]
    if not selected:
        raise NoLoraLayersError(f"no {'/'.join(target)} layer of the model matches the LoRA target: it has no "
                                "layer a LoRA can train")
    if skip_small_layers:
        widest = max(min(_matrix_shape(layer)) for _, layer in selected)
        selected = [(name, layer) for name, layer in selected if rank <= min(_matrix_shape(layer))]
        if not selected:
            raise LoraTargetError(f"LoRA rank {rank} exceeds the width of every {'/'.join(target)} layer of the model "
                                  f"(the widest allows rank {widest}); lower the rank")
    grouped = [name for name, layer in selected if isinstance(layer, nn.Conv2d) and layer.groups != 1]
    if grouped:
        raise LoraTargetError(f"grouped convolutions cannot take a LoRA here: {grouped[:5]}; exclude them with "
                              "name_filter")
    too_small = [
        f"{name} ({type(layer).__name__} {_matrix_shape(layer)[0]}->{_matrix_shape(layer)[1]})"
        for name, layer in selected
        if rank > min(_matrix_shape(layer))
    ]
    if too_small:
        raise LoraTargetError(
            f"LoRA rank {rank} exceeds min(in, out) of {len(too_small)} layer(s): {', '.join(too_small[:5])}"
            f"{' ...' if len(too_small) > 5 else ''}; lower the rank, exclude them with name_filter or pass "
            "skip_small_layers=True"
        )

    adapters: dict[str, LoraAdapter] = {}
    with torch.inference_mode(False):  # the host may run everything under inference mode
        for name, layer in selected:
            weight = layer.weight
            adapter_dtype = dtype or (torch.float64 if weight.dtype == torch.float64 else torch.float32)
            adapter = LoraAdapter(layer, rank, alpha, adapter_dtype, weight.device)
            if init == "zero-up":
                nn.init.zeros_(adapter.lora_up.weight)
            adapters[name] = adapter
    return LoraSet(module, adapters)


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of a network's weights (index-weighted sum of every tensor's sum, in name order), so a
    LoRA records which base it was trained on."""
    digest = torch.zeros((), dtype=torch.float64)
    for index, (_, tensor) in enumerate(sorted(module.state_dict().items())):
        digest += (index + 1) * tensor.detach().double().sum().cpu()
    return f"{float(digest):.10e}"


def ensure_autograd_compatible(module: nn.Module) -> int:
    """Replace parameters and buffers created under ``torch.inference_mode`` by equal normal tensors.

    Hosts such as ComfyUI load models under inference mode; autograd cannot save such tensors
    for backward, so a LoRA below them could not be trained. Names, values, dtypes, devices and
    ``requires_grad`` are kept; only the tensor objects change (one tensor at a time, so peak
    memory grows by one tensor). Returns how many tensors were replaced.
    """
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is not None and param.is_inference():
                    owner._parameters[name] = nn.Parameter(param.clone(), requires_grad=param.requires_grad)
                    replaced += 1
            for name, buffer in list(owner._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    owner._buffers[name] = buffer.clone()
                    replaced += 1
    return replaced


# -- state dicts ------------------------------------------------------------------------------
def lora_state_dict(loraset: LoraSet, prefix: str = "diffusion_model.",
                    dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """``<prefix><module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` on CPU.

    With ``loraset`` attached to ComfyUI's ``BaseModel.diffusion_model`` and the default prefix,
    these are the keys ComfyUI's LoraLoader maps onto the diffusion model's weights.
    """
    state: dict[str, Tensor] = {}
    for name, adapter in loraset.adapters.items():
        for part in ("lora_up", "lora_down"):
            weight = getattr(adapter, part).weight.detach()
            state[f"{prefix}{name}.{part}.weight"] = weight.to("cpu", dtype or weight.dtype).contiguous()
        state[f"{prefix}{name}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)
    return state


def check_lora_state_dict(loraset: LoraSet, state_dict: Mapping[str, Tensor], prefix: str = "diffusion_model.") -> None:
    """Raise ``ValueError`` unless ``state_dict`` holds every key of ``loraset`` with the adapter's shape."""
    missing = [key for key in lora_state_dict_keys(loraset, prefix) if key not in state_dict]
    if missing:
        raise ValueError(f"LoRA state is missing {len(missing)} key(s), e.g. {missing[:3]}")
    wrong = [f"{key} has shape {tuple(state_dict[key].shape)}, expected {tuple(param.shape)}"
             for param, key in _weight_keys(loraset, prefix) if state_dict[key].shape != param.shape]
    if wrong:
        raise ValueError(f"LoRA weight {wrong[0]}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))


def _weight_keys(loraset: LoraSet, prefix: str) -> list[tuple[nn.Parameter, str]]:
    return [(getattr(adapter, part).weight, f"{prefix}{name}.{part}.weight")
            for name, adapter in loraset.adapters.items() for part in ("lora_up", "lora_down")]


def load_lora_state_dict(loraset: LoraSet, state_dict: Mapping[str, Tensor], prefix: str = "diffusion_model.") -> None:
    """Copy weights and alphas of a :func:`lora_state_dict` into ``loraset``.

    Every key and shape is checked first (:func:`check_lora_state_dict`): a refused state leaves ``loraset`` untouched.
    """
    check_lora_state_dict(loraset, state_dict, prefix)
    pairs = _weight_keys(loraset, prefix)
    with torch.no_grad():
        for param, key in pairs:
            param.copy_(state_dict[key])
        for name, adapter in loraset.adapters.items():
            adapter.alpha = float(state_dict[f"{prefix}{name}.alpha"])


def lora_state_dict_keys(loraset: LoraSet, prefix: str = "diffusion_model.") -> list[str]:
    return [f"{prefix}{name}.{suffix}" for name in loraset.adapters
            for suffix in ("lora_up.weight", "lora_down.weight", "alpha")]
