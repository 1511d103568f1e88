"""Results on the canvas: measuring nodes send their result as table rows (nodes/results.py), and Stride Compare
Results joins several reports into one table, a row per label."""
import json

import pytest


def test_measuring_nodes_send_table_rows_with_plain_word_help(comfy_host):
    graph = {
        "model": {"class_type": "StrideReferenceModel", "inputs": {"variant": "demo", "prediction": "eps",
                  "form": "flow map (ideal distilled student)", "flow_map_steps": 8}},
        "pos": {"class_type": "StrideClassPrompt", "inputs": {"prompt": "disc"}},
        "neg": {"class_type": "StrideClassPrompt", "inputs": {"prompt": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 8}},
        "run": {"class_type": "StrideFewStepSample", "inputs": {
            "model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "method": "lcm", "steps": 2, "cfg": 1.0, "gamma": 0.3, "eta": 0.2, "seed": 1, "denoise": 1.0}},
        "image": {"class_type": "StrideLatentToImage", "inputs": {"samples": ["run", 0], "scale": 4}},
        "metrics": {"class_type": "StrideReferenceMetrics", "inputs": {"samples": ["run", 0],
                                                                      "conditioning": ["pos", 0], "label": "lcm"}},
        "diversity": {"class_type": "StrideImageDiversity", "inputs": {"images": ["image", 0], "label": "lcm"}},
        "compare": {"class_type": "StrideCompareResults", "inputs": {"report_1": ["metrics", 0],
                                                                    "report_2": ["diversity", 0]}},
    }
    result = comfy_host.run(graph)
    assert result.success, result.error()
    for name, keys in (("metrics", {"swd", "nll_gap", "mode_recall", "mode_entropy"}), ("diversity", {"diversity"})):
        ui = result.outputs[name]
        (row,) = ui["stride_table"]
        assert row == json.loads(ui["text"][0]) and row["label"] == "lcm" and keys <= set(row)
        helped = {column["key"] for column in ui["stride_columns"]}
        shown = {key for key in row if key != "label" and not (key.endswith("_pm") and key[:-3] in row)}
        assert shown == helped and all(column["help"] for column in ui["stride_columns"]), "every row has its help"
        assert all(f"{key}_pm" in row for key in keys - {"diversity"}), "the figures come with their intervals"
    (joined,) = result.outputs["compare"]["stride_table"]
    assert joined == {**result.outputs["metrics"]["stride_table"][0], **result.outputs["diversity"]["stride_table"][0]}
    helped = {column["key"] for column in result.outputs["compare"]["stride_columns"]}
    assert helped == {key for key in joined if key != "label" and not key.endswith("_pm")}, "the comparison's help"


def test_compare_results_keeps_one_row_per_label_in_order(comfy_host):
    compare = comfy_host.nodes.NODE_CLASS_MAPPINGS["StrideCompareResults"]
    rows = json.loads(compare.execute(json.dumps({"label": "base", "swd": 0.1}),
                                      json.dumps([{"label": "hybrid", "swd": 0.2}, {"label": "base", "n": 8}]))[0])
    assert rows == [{"label": "base", "swd": 0.1, "n": 8}, {"label": "hybrid", "swd": 0.2}]
    with pytest.raises(Exception, match="report_2: not a JSON report"):  # StrideError, told by its message
        compare.execute("{}", "not json")
