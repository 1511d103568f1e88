"""Stride Optimal Steps and Stride Saved Schedule inside a real ComfyUI.

The node's schedule must equal a direct distill_core search through the same ComfyUI call path (guider,
CFG, model sampling, the same noise); a saved result is reused without one model call; a schedule of
another model is refused; Cancel during the teacher trajectory or the DP stops at the next model call and
writes nothing; a damaged saved result is refused by name; the searched sigmas drive
SamplerCustomAdvanced and the Stride samplers, and the report's errors are what those samplers give.
"""
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill_core.reference.demo import DEMO_CLASS_NAMES, demo_mixture
from distill_core.reference.metrics import endpoint_error
from distill_core.sampling.optimal_steps import fingerprint, load_schedule, search_schedule
from distill_core.spaces import NoiseSpace

DENOISER = "denoiser (ideal many-step teacher)"
SEED, NOISES, ROWS, STEPS, TEACHER_STEPS, CFG = 5, 6, 4, 4, 24, 1.5
PROMPT = "ring"
SEARCH = {"steps": STEPS, "teacher_steps": TEACHER_STEPS, "noise_samples": NOISES, "solver": "euler",
          "teacher_solver": "euler", "teacher_scheduler": "normal", "mode": "paper", "seed": SEED, "cfg": CFG}


@pytest.fixture(autouse=True, scope="module")
def own_schedules_folder(comfy_host, tmp_path_factory):
    """This module's schedules go to a folder of its own, put first in folder_paths (where the node writes, as an
    extra_model_paths.yaml entry would), so the host's models/stride/schedules stays as other tests expect it."""
    paths = comfy_host.folder_paths.folder_names_and_paths["stride_schedules"][0]
    folder = str(tmp_path_factory.mktemp("schedules"))
    paths.insert(0, folder)
    comfy_host.folder_paths.filename_list_cache.clear()
    yield
    paths.remove(folder)
    comfy_host.folder_paths.filename_list_cache.clear()


def node(comfy_host, name: str):
    return comfy_host.nodes.NODE_CLASS_MAPPINGS[name]


def schedules_folder(comfy_host) -> Path:
    return Path(comfy_host.folder_paths.get_folder_paths("stride_schedules")[0])


def saved_files(comfy_host) -> set[str]:
    folder = schedules_folder(comfy_host)
    return {path.name for path in folder.iterdir()} if folder.is_dir() else set()


def search_graph(name: str, prediction: str = "eps", **overrides) -> dict:
    settings = {**SEARCH, **overrides}
    return {
        "model": {"class_type": "StrideReferenceModel",
                  "inputs": {"variant": "demo", "prediction": prediction, "form": DENOISER, "flow_map_steps": 8}},
        "pos": {"class_type": "StrideClassPrompt", "inputs": {"prompt": PROMPT}},
        "neg": {"class_type": "StrideClassPrompt", "inputs": {"prompt": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": ROWS}},
        "search": {"class_type": "StrideOptimalSteps", "inputs": {
            "latent_image": ["latent", 0], "model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "schedule_name": name, **settings}},
    }


def file_of(comfy_host, report: str) -> Path:
    """The schedule file a report names (searched and saved, or reused)."""
    name = re.search(r"models/stride/schedules/(\S+\.safetensors)", report).group(1)
    return schedules_folder(comfy_host) / name


def reference_parts(comfy_host, prediction: str = "eps"):
    model = node(comfy_host, "StrideReferenceModel").execute("demo", prediction, DENOISER, 8)[0]
    positive = node(comfy_host, "StrideClassPrompt").execute(PROMPT)[0]
    negative = node(comfy_host, "StrideClassPrompt").execute("")[0]
    return model, positive, negative


def direct_search(comfy_host, prediction: str):
    """distill_core's search_schedule run by hand through a CFGGuider's sampling path on the same noise."""
    import comfy.sample
    import comfy.samplers

    model, positive, negative = reference_parts(comfy_host, prediction)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(CFG)
    teacher = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal",
                                              TEACHER_STEPS).double()
    noise = comfy.sample.prepare_noise(torch.zeros((NOISES, 4, 8, 8)), SEED)
    # ComfyUI's start from an empty latent: EPS at its top sigma scales the noise by sqrt(1 + s^2), flow by s = 1
    scale = math.sqrt(1 + float(teacher[0]) ** 2) if prediction == "eps" else float(teacher[0])
    result = {}

    def sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        def denoiser(rows, sigma):
            return model_k(rows, sigma.to(rows.dtype), **extra_args)

        result["found"] = search_schedule(denoiser, noise * scale, teacher, STEPS, max_batch=ROWS)
        return x

    guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(sampler), teacher.float(), seed=SEED)
    return result["found"], noise * scale, teacher


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_node_equals_a_direct_search_on_the_same_call_path(comfy_host, prediction):
    before = saved_files(comfy_host)
    result = comfy_host.run(search_graph(f"direct_{prediction}", prediction))
    assert result.success, result.error()
    report = result.outputs["search"]["text"][0]
    assert "(searched, saved as models/stride/schedules/" in report
    assert saved_files(comfy_host) - before == {file_of(comfy_host, report).name}
    saved = load_schedule(file_of(comfy_host, report))
    direct, start, teacher = direct_search(comfy_host, prediction)
    assert saved.indices == direct.indices
    assert torch.equal(saved.sigmas, direct.sigmas)
    assert saved.report["evaluations"] == direct.cost.evaluations

    # the same schedule from the exact float64 mixture (no ComfyUI): the node adds nothing of its own
    mixture, class_id = demo_mixture(), DEMO_CLASS_NAMES.index(PROMPT)
    table = reference_parts(comfy_host, prediction)[0].get_model_object("model_sampling").sigmas
    space = NoiseSpace.from_sigma_table("ve" if prediction == "eps" else "flow", table)

    def exact(x, sigma):
        return mixture.cfg_denoise(x, sigma, space, torch.full((x.shape[0],), class_id), CFG)

    assert search_schedule(exact, start.double(), teacher, STEPS).indices == saved.indices


def test_report_errors_are_what_samplers_give_on_the_schedules(comfy_host):
    """SamplerCustomAdvanced with euler on the searched sigmas and on the teacher's M steps, from RandomNoise with the
    search's seed and batch: their distance is the report's error of the searched schedule, noise by noise."""
    graph = search_graph("report_check")
    graph.update({
        "noises": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": NOISES}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["model", 0], "positive": ["pos", 0],
                                                          "negative": ["neg", 0], "cfg": CFG}},
        "euler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "ddim": {"class_type": "StrideTCDSampler", "inputs": {"gamma": 0.0}},
        "teacher": {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "normal",
                                                                "steps": TEACHER_STEPS, "denoise": 1.0}},
    })
    for name, sampler, sigmas in (("student", "euler", ["search", 0]), ("stride_ddim", "ddim", ["search", 0]),
                                  ("teacher_run", "euler", ["teacher", 0])):
        graph[name] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": [sampler, 0], "sigmas": sigmas,
            "latent_image": ["noises", 0]}}
        graph[f"save_{name}"] = {"class_type": "SaveLatent", "inputs": {"samples": [name, 0],
                                                                        "filename_prefix": f"oss_{name}"}}
    result = comfy_host.run(graph)
    assert result.success, result.error()
    latents = {name: load_file(str(comfy_host.output_path(result.outputs[f"save_{name}"]["latents"][0])))
               ["latent_tensor"] for name in ("student", "stride_ddim", "teacher_run")}
    saved = load_schedule(file_of(comfy_host, result.outputs["search"]["text"][0]))
    reported = torch.tensor(saved.report["errors"]["searched"], dtype=torch.float64)
    measured = endpoint_error(latents["student"], latents["teacher_run"])
    assert torch.allclose(measured, reported, rtol=1e-4, atol=1e-5)
    assert torch.allclose(latents["stride_ddim"], latents["student"], atol=1e-5)  # Stride's DDIM is Euler
    compared = {name: sum(values) / len(values) for name, values in saved.report["errors"].items()}
    assert compared["searched"] < min(compared[name] for name in ("normal", "simple", "karras", "beta"))


def test_a_saved_result_is_reused_without_model_calls(comfy_host):
    model, positive, negative = reference_parts(comfy_host)
    calls = []
    model.model.diffusion_model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    search = node(comfy_host, "StrideOptimalSteps")
    latent = {"samples": torch.zeros((ROWS, 4, 8, 8))}
    before = saved_files(comfy_host)
    settings = {**SEARCH, "seed": SEED + 1}
    first = search.execute(latent, **settings, schedule_name="reuse", model=model, positive=positive,
                           negative=negative)
    assert calls and max(calls) <= 2 * ROWS  # cond and uncond of one call's rows
    path = file_of(comfy_host, first[1])
    assert saved_files(comfy_host) - before == {path.name}
    written = path.stat().st_mtime_ns
    calls.clear()
    rebuilt, positive, negative = reference_parts(comfy_host)  # the same model built again: the same fingerprint
    second = search.execute(latent, **settings, schedule_name="another_name", model=rebuilt, positive=positive,
                            negative=negative)
    assert calls == []
    assert torch.equal(first[0], second[0])
    assert f"reused models/stride/schedules/{path.name}, no search" in second[1]
    assert saved_files(comfy_host) - before == {path.name} and path.stat().st_mtime_ns == written

    third = search.execute(latent, **{**settings, "cfg": 2.0}, schedule_name="reuse", model=model,
                           positive=positive, negative=negative)
    assert calls, "another cfg is another search"
    assert "searched, saved as" in third[1]


def fingerprint_of(comfy_host, model) -> str:
    """The model fingerprint a saved schedule carries (computed by the pack's compat as ComfyUI loaded it)."""
    package = node(comfy_host, "StrideOptimalSteps").__module__.rsplit(".nodes.", 1)[0]
    return fingerprint({"model": sys.modules[f"{package}.nodes.compat"].model_identity(model)})


def test_fingerprints_tell_models_apart_and_clones_alike(comfy_host):
    reference = node(comfy_host, "StrideReferenceModel")
    demo = node(comfy_host, "StrideDemoModel").execute()[0]
    patched = demo.clone()
    key = next(name for name in demo.model.state_dict() if name.startswith("diffusion_model.") and
               name.endswith("weight"))
    patched.add_patches({key: (torch.full_like(demo.model.state_dict()[key], 0.01),)}, 1.0)
    models = {
        "eps": reference.execute("demo", "eps", DENOISER, 8)[0],
        "v": reference.execute("demo", "v", DENOISER, 8)[0],
        "flow": reference.execute("demo", "flow", DENOISER, 8)[0],
        "collapsed": reference.execute("demo collapsed (2 of 8 modes)", "eps", DENOISER, 8)[0],
        "flow map": reference.execute("demo", "eps", "flow map (ideal distilled student)", 8)[0],
        "demo": demo, "demo + patch": patched,
    }
    prints = {name: fingerprint_of(comfy_host, model) for name, model in models.items()}
    assert len(set(prints.values())) == len(prints), prints
    assert fingerprint_of(comfy_host, demo.clone()) == prints["demo"]
    assert fingerprint_of(comfy_host, node(comfy_host, "StrideDemoModel").execute()[0]) == prints["demo"]


def test_saved_schedule_loads_for_its_model_and_refuses_another(comfy_host):
    result = comfy_host.run(search_graph("for_loading"))
    assert result.success, result.error()
    name = file_of(comfy_host, result.outputs["search"]["text"][0]).name
    before = saved_files(comfy_host)
    comfy_host.folder_paths.filename_list_cache.clear()
    graph = search_graph("for_loading")
    graph["load"] = {"class_type": "StrideSavedSchedule", "inputs": {"model": ["model", 0], "schedule": name}}
    graph["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["load", 1]}}
    loaded = comfy_host.run(graph)
    assert loaded.success, loaded.error()
    assert saved_files(comfy_host) == before
    saved = load_schedule(schedules_folder(comfy_host) / name)
    model = reference_parts(comfy_host)[0]
    sigmas, report = node(comfy_host, "StrideSavedSchedule").execute(model, name)[:2]
    assert torch.equal(sigmas, saved.sigmas.float()) and f"loaded {name}" in report

    graph["other"] = {"class_type": "StrideReferenceModel",
                      "inputs": {"variant": "demo collapsed (2 of 8 modes)", "prediction": "eps", "form": DENOISER,
                                 "flow_map_steps": 8}}
    graph["load"]["inputs"]["model"] = ["other", 0]
    refused = comfy_host.run(graph)
    assert not refused.success
    error = refused.error()
    assert error["exception_type"].endswith("StrideError")
    assert error["exception_message"].startswith(f"schedule: {name} was searched for another model")


TEACHER_CALLS = TEACHER_STEPS * math.ceil(NOISES / ROWS)  # the trajectory's calls: NOISES rows, ROWS per call


@pytest.mark.parametrize("cancel_at", [3, TEACHER_CALLS + 2], ids=["in the teacher trajectory", "in the DP"])
def test_cancel_stops_at_the_next_model_call_and_writes_nothing(comfy_host, cancel_at):
    before = saved_files(comfy_host)
    seen = []

    def cancel(value, total):
        seen.append((value, total))
        if value == cancel_at:
            comfy_host.interrupt()

    comfy_host.progress_listener = cancel
    try:
        cancelled = comfy_host.run(search_graph("cancelled", seed=SEED + 10 + cancel_at))
    finally:
        comfy_host.progress_listener = None
    assert not cancelled.success
    assert any(kind == "execution_interrupted" for kind, _ in cancelled.messages)
    assert [value for value, _ in seen] == list(range(1, cancel_at + 1)), "stopped at the next model call"
    assert seen[0][1] > TEACHER_CALLS + (STEPS - 1)  # the bar counts the DP's calls and the scoring's too
    assert saved_files(comfy_host) == before
    again = comfy_host.run(search_graph("after_cancel", seed=SEED + 10 + cancel_at))
    assert again.success and "searched, saved as" in again.outputs["search"]["text"][0]


def test_a_damaged_saved_result_is_refused_by_name_and_kept(comfy_host):
    """The search finds its saved result damaged: it names the file and says to delete it, and writes nothing."""
    model, positive, negative = reference_parts(comfy_host)
    search = node(comfy_host, "StrideOptimalSteps")
    latent = {"samples": torch.zeros((ROWS, 4, 8, 8))}
    settings = {**SEARCH, "seed": SEED + 3}
    path = file_of(comfy_host, search.execute(latent, **settings, schedule_name="damaged", model=model,
                                              positive=positive, negative=negative)[1])
    damaged = path.read_bytes()[:-7]
    path.write_bytes(damaged)
    before = saved_files(comfy_host)
    with pytest.raises(Exception, match=r"^schedule_name: .*damaged.*delete models/stride/schedules/") as raised:
        search.execute(latent, **settings, schedule_name="damaged_again", model=model, positive=positive,
                       negative=negative)
    assert type(raised.value).__name__ == "StrideError"
    assert saved_files(comfy_host) == before and path.read_bytes() == damaged
