"""LoRA hooks: exactness of attach / disable / remove, ComfyUI compatibility, state-dict round trip."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_core.safe_files import read_safetensors, write_safetensors
from distill_core.training.lora import (
    NoLoraLayersError,
    attach_lora,
    ensure_autograd_compatible,
    load_lora_state_dict,
    lora_state_dict,
)
from tests.unit import distill_fixtures
from tests.unit.distill_fixtures import tiny_comfy_sd15

comfy = distill_fixtures.comfy  # the fixture, found by pytest under this name (the tests take it as a parameter)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.GroupNorm(2, 8)])
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=(2, 3)))


def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().double()


def sample_input() -> torch.Tensor:
    return torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def randomize(loraset) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in loraset.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)


def test_zero_init_lora_leaves_outputs_identical():
    net, x = tiny_net(), sample_input()
    base = net(x)
    loraset = attach_lora(net, rank=2)
    assert sorted(loraset.adapters) == ["blocks.0", "conv", "head"]
    assert torch.equal(net(x), base)


def test_enabled_false_is_the_base_network_and_nests():
    net, x = tiny_net(), sample_input()
    base = net(x)
    loraset = attach_lora(net, rank=2, alpha=4.0)
    randomize(loraset)
    adapted = net(x)
    assert (adapted - base).abs().max() > 1e-3
    with loraset.enabled(False):
        assert torch.equal(net(x), base)
        with loraset.enabled(True):
            assert torch.equal(net(x), adapted)
        assert torch.equal(net(x), base)
    assert loraset.is_enabled and torch.equal(net(x), adapted)


def test_remove_restores_the_module_exactly():
    net, x = tiny_net(), sample_input()
    base = net(x)
    state_before = {key: (value, value.clone()) for key, value in net.state_dict().items()}
    params_before = dict(net.named_parameters())
    loraset = attach_lora(net, rank=2)
    randomize(loraset)
    assert not torch.equal(net(x), base)
    assert list(net.state_dict()) == list(state_before)  # adapters are not registered in the module
    loraset.remove()
    assert not loraset.is_attached
    assert torch.equal(net(x), base)
    assert all(not module._forward_hooks for module in net.modules())
    assert dict(net.named_parameters()).keys() == params_before.keys()
    assert all(net.get_parameter(name) is param for name, param in params_before.items())
    for key, value in net.state_dict().items():
        original, copy = state_before[key]
        assert value.data_ptr() == original.data_ptr() and torch.equal(value, copy)


def test_conv_and_linear_lora_equal_the_merged_weight_delta():
    """The hook equals adding (alpha / rank) * up.flatten(1) @ down.flatten(1) to the weight."""
    net, x = tiny_net(), sample_input()
    loraset = attach_lora(net, rank=3, alpha=1.5)
    randomize(loraset)
    hooked = net(x)
    loraset.remove()
    with torch.no_grad():
        for name, adapter in loraset.adapters.items():
            weight = net.get_submodule(name).weight
            merged = adapter.lora_up.weight.flatten(1) @ adapter.lora_down.weight.flatten(1)
            weight += adapter.scale * merged.reshape(weight.shape)
    assert torch.allclose(net(x), hooked, atol=1e-12, rtol=0)


def test_merged_folds_the_lora_into_the_weights_and_puts_them_back():
    """merged(): the same outputs as the hooks (conv with stride/dilation, linear), no autograd inside,
    the layers' own weight objects back afterwards, also when the forward raises."""
    net, x = tiny_net(), sample_input()
    loraset = attach_lora(net, rank=3, alpha=1.5)
    randomize(loraset)
    weights = {name: net.get_submodule(name).weight for name in loraset.adapters}
    values = {name: weight.detach().clone() for name, weight in weights.items()}
    hooked = net(x)
    with loraset.merged():
        assert not torch.is_grad_enabled()
        folded = net(x)
    assert torch.allclose(folded, hooked, atol=1e-12, rtol=0)
    with pytest.raises(ValueError), loraset.merged():
        net.conv(x)
        raise ValueError("a forward that fails half-way")
    for name, weight in weights.items():
        assert net.get_submodule(name).weight is weight and torch.equal(weight, values[name])
    assert torch.equal(net(x), hooked)
    loraset.remove()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merged_keeps_the_hook_on_low_precision_weights(dtype):
    """Folded into float16/bfloat16 weights, a LoRA is rounded to the weights' precision (small ones vanish); the target
    pass must compute what the student computes, so these layers keep the hook: same outputs, bit for bit."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).to(dtype)
    loraset = attach_lora(net, rank=2)
    with torch.no_grad():
        for adapter in loraset.adapters.values():
            adapter.lora_up.weight.fill_(1e-2)
    x = torch.randn(4, 16).to(dtype)
    hooked = net(x)
    with loraset.enabled(False):
        assert not torch.equal(net(x), hooked), "the LoRA changes the output"
    with loraset.merged():
        assert torch.equal(net(x), hooked)
    assert loraset.output_dtypes == {dtype}
    loraset.remove()


def test_merged_keeps_the_hook_where_the_host_transforms_the_weight(comfy):
    """A ComfyUI weight_function (a run-time patch) sees the base weight, as with the hooks."""
    ops = comfy.ops.disable_weight_init
    torch.manual_seed(0)
    net = nn.Sequential(ops.Linear(5, 5), ops.Linear(5, 5))
    for layer in net:
        nn.init.normal_(layer.weight)
        nn.init.normal_(layer.bias)
    net[0].weight_function = [lambda weight: weight * 2]
    loraset = attach_lora(net, rank=2, init="random")
    x = torch.randn(3, 5)
    hooked = net(x)
    with loraset.merged():
        folded = net(x)
    assert torch.allclose(folded, hooked, atol=1e-5)
    loraset.remove()


def test_name_filter_kinds_and_rank_validation():
    net = tiny_net()
    assert sorted(attach_lora(net, 2, target=("Linear",)).adapters) == ["head"]
    assert sorted(attach_lora(net, 2, name_filter=r"^blocks\.").adapters) == ["blocks.0"]
    assert sorted(attach_lora(net, 2, name_filter=lambda name: name != "head").adapters) == ["blocks.0", "conv"]
    with pytest.raises(ValueError, match=r"rank 6 exceeds min\(in, out\).*head \(Linear 8->5\)"):
        attach_lora(net, 6)
    assert sorted(attach_lora(net, 6, skip_small_layers=True).adapters) == ["blocks.0", "conv"]
    for bad_rank in (0, -1, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            attach_lora(net, bad_rank)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        attach_lora(net, 2, target=("Conv3d",))
    with pytest.raises(ValueError, match="no Linear layer"):
        attach_lora(net, 2, target=("Linear",), name_filter="nothing")
    with pytest.raises(ValueError, match="grouped convolutions"):
        attach_lora(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), 1)
    with pytest.raises(ValueError, match="init"):
        attach_lora(net, 2, init="gaussian")


def test_state_dict_keys_and_round_trip(tmp_path):
    net = tiny_net()
    loraset = attach_lora(net, rank=2, alpha=3.0)
    randomize(loraset)
    state = lora_state_dict(loraset)
    assert sorted(state) == sorted(
        f"diffusion_model.{name}.{part}" for name in ("conv", "blocks.0", "head")
        for part in ("lora_up.weight", "lora_down.weight", "alpha"))
    assert state["diffusion_model.conv.lora_down.weight"].shape == (2, 3, 3, 3)
    assert state["diffusion_model.conv.lora_up.weight"].shape == (8, 2, 1, 1)
    assert state["diffusion_model.head.alpha"].item() == 3.0
    path = tmp_path / "lora.safetensors"
    write_safetensors(path, state, {"note": "test"})
    loaded, metadata = read_safetensors(path)
    assert metadata == {"note": "test"}
    other = attach_lora(tiny_net(), rank=2, alpha=1.0)
    load_lora_state_dict(other, loaded)
    x = sample_input()
    assert torch.equal(other.root(x), net(x))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(other, {}, prefix="x.")


def test_inference_mode_weights_become_trainable_without_changing_values():
    with torch.inference_mode():
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        net.register_buffer("offset", torch.ones(2))
    loraset = attach_lora(net, rank=1, init="random")
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"[Ii]nference tensor"):
        (net(x) * net.offset).sum().backward()
    before = {key: value.clone() for key, value in net.state_dict().items()}
    assert ensure_autograd_compatible(net) == 5
    assert ensure_autograd_compatible(net) == 0
    assert all(torch.equal(net.state_dict()[key], value) for key, value in before.items())
    (net(x) * net.offset).sum().backward()
    assert all(param.grad is not None for param in loraset.parameters())


def test_comfy_ops_layers_take_hooks_alongside_weight_functions(comfy):
    ops = comfy.ops.disable_weight_init
    torch.manual_seed(0)
    net = nn.Sequential(ops.Conv2d(3, 4, 3, padding=1), ops.Linear(5, 5))
    for layer in net:
        nn.init.normal_(layer.weight)
        nn.init.normal_(layer.bias)
        layer.weight_function = [lambda weight: weight * 2]  # a runtime weight patch, as ComfyUI's hooks add
    x = torch.randn(2, 3, 5, 5)
    base = net(x)
    loraset = attach_lora(net, rank=2, init="random")
    with loraset.enabled(False):
        assert torch.equal(net(x), base)
    conv, linear = loraset.adapters["0"], loraset.adapters["1"]
    conv_out = nn.functional.conv2d(x, net[0].weight * 2, net[0].bias, padding=1) + conv.delta(x)
    full = nn.functional.linear(conv_out, net[1].weight * 2, net[1].bias) + linear.delta(conv_out)
    assert torch.allclose(net(x), full, atol=1e-5)
    loraset.remove()
    assert torch.equal(net(x), base)


def test_saved_lora_loads_in_comfyui_and_reproduces_the_hooked_model(comfy, tmp_path):
    """Keys map through ComfyUI's LoraLoader path and its weight merge equals the hooks."""
    model = tiny_comfy_sd15(comfy)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.5, 3.0])
    context = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        base = model.apply_model(x, sigma, c_crossattn=context)
    loraset = attach_lora(model.diffusion_model, rank=4, alpha=2.0, init="random")
    with torch.inference_mode():
        hooked = model.apply_model(x, sigma, c_crossattn=context)
    assert (hooked - base).abs().max() > 1e-3
    path = tmp_path / "stride_lora.safetensors"
    write_safetensors(path, lora_state_dict(loraset))
    loraset.remove()

    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert len(patched.patches) == len(loraset.adapters)
    with torch.inference_mode():
        patched.patch_model()
        merged = model.apply_model(x, sigma, c_crossattn=context)
        patched.unpatch_model()
        restored = model.apply_model(x, sigma, c_crossattn=context)
    assert torch.allclose(merged, hooked, atol=1e-5, rtol=1e-4)
    assert torch.equal(restored, base)


def test_lora_set_moves_with_to_and_keeps_working():
    net = nn.Sequential(nn.Linear(4, 4))
    loraset = attach_lora(net, rank=2, init="random")
    assert loraset.parameters()[0].dtype == torch.float32
    net.double()
    loraset.to(dtype=torch.float64)
    assert all(param.dtype == torch.float64 for param in loraset.parameters())
    x = torch.randn(3, 4, dtype=torch.float64)
    adapter = loraset.adapters["0"]
    assert torch.allclose(net(x), nn.functional.linear(x, net[0].weight, net[0].bias) + adapter.delta(x), atol=1e-12)


def test_a_model_without_target_layers_is_not_a_rank_problem():
    class NoLayers(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(NoLoraLayersError, match="no Linear/Conv2d layer of the model matches"):
        attach_lora(NoLayers(), 4, skip_small_layers=True)
    with pytest.raises(ValueError, match=r"the widest allows rank \d+\); lower the rank") as refused:  # all too narrow
        attach_lora(tiny_net(), 10_000, skip_small_layers=True)
    assert not isinstance(refused.value, NoLoraLayersError)
