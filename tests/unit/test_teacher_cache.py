"""The teacher cache: the data-free pool kept across runs, identical on reuse, refused for another model."""
from __future__ import annotations

import os

import pytest
import torch

from distill_core.progress import Progress
from distill_core.safe_files import read_safetensors, write_safetensors
from distill_core.training.cli import demo_network
from distill_core.training.config import DistillConfig
from distill_core.training.lora import attach_lora
from distill_core.training.teacher_cache import CacheKey, TeacherCache, tensor_fingerprint
from distill_core.training.trainer import DistillTrainer, train


def setup(**overrides):
    settings = {"objective": "lcm", "steps": 3, "rank": 2, "batch": 2, "lr": 1e-3, "data_free_samples": 4,
                "data_free_steps": 3}
    config = DistillConfig(**{**settings, **overrides})
    network = demo_network({"dtype": "float64", "num_latents": 0, "hidden": 8}, config)
    torch.manual_seed(5)
    return network, attach_lora(network.module, config.rank, config.alpha), config


def weights_fingerprint(network) -> str:
    return tensor_fingerprint(network.module.state_dict().items())


def counting(network, calls):
    def denoise(x, sigma, cond):
        calls.append(1)
        return network.denoiser(x, sigma, cond)
    return denoise


def test_a_cached_pool_is_reused_bit_for_bit_without_teacher_calls(tmp_path):
    network, loraset, config = setup()
    cache = TeacherCache(tmp_path, weights_fingerprint(network))
    first = DistillTrainer(network.denoiser, loraset, network.space, config, network.data)
    first.train(cache=cache)
    assert cache.last == "miss" and len(os.listdir(tmp_path)) == 1
    uncached = DistillTrainer(network.denoiser, loraset, network.space, config, network.data)
    assert torch.equal(first.latents(), uncached.latents()), "the cache stores what the run generated"

    network, loraset, config = setup()
    calls: list[int] = []
    trainer = DistillTrainer(counting(network, calls), loraset, network.space, config, network.data)
    trainer.prepare_data(Progress(), cache)
    assert cache.last == "hit" and calls == [] and torch.equal(trainer.latents(), first.latents())


def test_a_run_from_the_cache_trains_exactly_like_one_without(tmp_path):
    network, loraset, config = setup()
    plain = train(network.denoiser, loraset, network.space, config, network.data).losses
    cache = TeacherCache(tmp_path, weights_fingerprint(network))
    for expected in ("miss", "hit"):
        network, loraset, config = setup()
        assert train(network.denoiser, loraset, network.space, config, network.data, cache=cache).losses == plain
        assert cache.last == expected


def test_a_pool_made_by_another_model_is_refused_and_replaced(tmp_path):
    network, loraset, config = setup()
    train(network.denoiser, loraset, network.space, config, network.data, cache=TeacherCache(tmp_path, "model-a"))
    (entry,) = os.listdir(tmp_path)
    with torch.no_grad():
        network.module.conv_out.weight.mul_(1.5)  # the user changed the model
    changed = TeacherCache(tmp_path, weights_fingerprint(network))
    calls: list[int] = []
    trainer = DistillTrainer(counting(network, calls), loraset, network.space, config, network.data)
    trainer.train(cache=changed)
    assert changed.last.startswith("refused") and "another model" in changed.last
    assert len(calls) > 0, "the pool was generated again"
    assert os.listdir(tmp_path) == [entry], "the entry was replaced, not added"
    assert read_safetensors(tmp_path / entry)[1]["model"] == changed.model_fingerprint
    assert changed.load(trainer.pool_key()) is not None and changed.last == "hit"


@pytest.mark.parametrize("change", [{"seed": 1}, {"data_free_steps": 2}, {"data_free_guidance": 3.0}, {"batch": 4}])
def test_other_settings_make_another_entry(tmp_path, change):
    network, loraset, config = setup()
    key = DistillTrainer(network.denoiser, loraset, network.space, config, network.data).pool_key()
    network, loraset, config = setup(**change)
    assert DistillTrainer(network.denoiser, loraset, network.space, config, network.data).pool_key() != key


def test_other_prompts_make_another_entry():
    network, loraset, config = setup()
    key = DistillTrainer(network.denoiser, loraset, network.space, config, network.data).pool_key()
    network.data.conds[0] = network.data.conds[0] + 1e-6
    other = DistillTrainer(network.denoiser, loraset, network.space, config, network.data).pool_key()
    assert other.inputs != key.inputs


def test_an_edited_entry_is_refused(tmp_path):
    cache = TeacherCache(tmp_path, "model")
    key = CacheKey.of("pool", {"seed": 0}, [("cond", torch.ones(2))])
    cache.store(key, {"pool": torch.zeros(3)})
    tensors, metadata = read_safetensors(cache.path(key))
    write_safetensors(cache.path(key), tensors, {**metadata, "settings": '{"seed": 1}'})
    assert cache.load(key) is None and cache.last.startswith("refused") and "settings" in cache.last
    cache.path(key).write_bytes(b"\x80\x04 not safetensors")
    assert cache.load(key) is None and cache.last.startswith("refused")


def test_the_fingerprint_sees_every_value_dtype_shape_and_name():
    base = [("w", torch.arange(6, dtype=torch.float32).reshape(2, 3))]
    digest = tensor_fingerprint(base)
    assert tensor_fingerprint([("w", base[0][1].clone())]) == digest
    changed = base[0][1].clone()
    changed[1, 2] = torch.nextafter(changed[1, 2], torch.tensor(100.0))
    variants = [[("w", changed)], [("v", base[0][1])], [("w", base[0][1].reshape(3, 2))],
                [("w", base[0][1].double())], [("w", base[0][1].to(torch.bfloat16))]]
    assert len({digest, *(tensor_fingerprint(variant) for variant in variants)}) == 1 + len(variants)
    fp8 = torch.linspace(-1, 1, 8).to(torch.float8_e4m3fn)
    assert tensor_fingerprint([("w", fp8)]) != tensor_fingerprint([("w", fp8.float())])
