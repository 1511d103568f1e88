"""Results on the canvas: how a measuring node shows its numbers, and a node that compares several reports.

A measuring node is an output node with a ``report`` output (JSON text) and no loss output (a trainer reports
too, but shows a loss chart). Its UI output carries the same
result as table rows, ``stride_table`` (a list of ``{column: value}`` with a ``label``), and plain-word
explanations of the columns, ``stride_columns`` (``[{"key", "help"}]``); ``web/stride_results.js`` draws
them as a compact table on the node (for several rows with a bar in each cell), and keeps ``text`` for
other clients. ``scripts/workflow_builder.py`` keeps room for that table on every such node.
"""
from __future__ import annotations

import json
from typing import Any

from .compat import StrideError, io

CATEGORY = "stride/reference"
TABLE = "stride_table"
COLUMNS = "stride_columns"
MAX_REPORTS = 8

METRIC_HELP = {  # what each score of Stride Reference Metrics means, in plain words (the cells' tooltips)
    "n": "number of samples scored",
    "repeats": "independent groups the samples were split into; each figure's interval is over them",
    "swd": "distance from the data (sliced Wasserstein distance to fresh data); lower is closer",
    "swd_data": "the same distance between two fresh data sets: the floor for this many samples",
    "mode_tv": "how far the modes' shares are from their true weights (total variation: 0 = exact, 1 = disjoint)",
    "mode_tv_data": "the same for a fresh data set: the floor for this many samples",
    "mode_recall": "share of the data's modes (shape and colour) that appear in the samples",
    "mode_entropy": "how evenly the modes appear: 1 = all equally often, 0 = one mode only",
    "mode_entropy_data": "the data's own mode entropy",
    "mode_mean_shift": "how far each mode's mean is from the true one (count-weighted and unbiased, so it can dip "
                       "below 0 by chance; 0 for data)",
    "mode_cov_error": "how far each mode's covariance is from the true one (count-weighted and unbiased, so it can "
                      "dip below 0 by chance; 0 for data)",
    "nll_gap": "negative log-likelihood minus the data's: below 0 the samples are too concentrated, above 0 too "
               "spread",
}

DIVERSITY_HELP = {  # what each number of Stride Image Diversity means, in plain words
    "n": "number of images",
    "diversity": "how different the images are from each other (colour and edges together); 0 = identical",
    "colour_diversity": "the same for colour alone (CIE Lab means and spreads)",
    "edge_diversity": "the same for shapes alone (edge directions and density)",
}

HELP = {**DIVERSITY_HELP, **METRIC_HELP}  # Stride Compare Results' tooltips: every measuring node's columns


def report_output(row: dict[str, Any], help_by_key: dict[str, str]) -> io.NodeOutput:
    """The node's ``report`` output (JSON of ``row``) and the UI that shows ``row`` as a table on the node."""
    text = json.dumps(row)
    columns = [{"key": key, "help": help_by_key[key]} for key in row if key in help_by_key]
    return io.NodeOutput(text, ui={"text": [text], TABLE: [row], COLUMNS: columns})


def merge_reports(reports: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Rows of several ``(input name, report)`` pairs (each report a JSON row or a list of rows), one per label
    in order of appearance; the columns of reports with the same label are joined into one row."""
    rows: dict[str, dict[str, Any]] = {}
    for index, text in reports:
        advice = "connect the report output of a Stride measuring node (e.g. Stride Reference Metrics)"
        try:
            parsed = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            raise StrideError(f"{index}: not a JSON report; {advice}") from None
        for row in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(row, dict):
                raise StrideError(f"{index}: a report row must be a JSON object, got {type(row).__name__}; {advice}")
            label = str(row.get("label", index))
            rows.setdefault(label, {"label": label}).update({k: v for k, v in row.items() if k != "label"})
    return list(rows.values())


class StrideCompareResults(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StrideCompareResults", display_name="Stride Compare Results", category=CATEGORY,
            description=("Shows several reports as one table on the node, one row per label, with a bar in each "
                         "cell to compare the rows at a glance. Reports with the same label (say Stride Reference "
                         "Metrics and Stride Image Diversity of the same samples) share a row."),
            inputs=[
                io.String.Input(f"report_{index}", force_input=True, optional=index > 1,
                                tooltip="The report output of a Stride measuring node (or of another Compare Results).")
                for index in range(1, MAX_REPORTS + 1)
            ],
            outputs=[io.String.Output(display_name="report", tooltip="JSON: the table's rows.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, report_1: str, report_2: str | None = None, report_3: str | None = None,
                report_4: str | None = None, report_5: str | None = None, report_6: str | None = None,
                report_7: str | None = None, report_8: str | None = None) -> io.NodeOutput:
        given = (report_1, report_2, report_3, report_4, report_5, report_6, report_7, report_8)
        rows = merge_reports([(f"report_{slot}", text) for slot, text in enumerate(given, 1) if text is not None])
        text = json.dumps(rows)
        keys = dict.fromkeys(key for row in rows for key in row)
        columns = [{"key": key, "help": HELP[key]} for key in keys if key in HELP]
        return io.NodeOutput(text, ui={"text": [text], TABLE: rows, COLUMNS: columns})


NODES: list[type[io.ComfyNode]] = [StrideCompareResults]
