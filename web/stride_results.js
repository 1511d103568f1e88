// Stride: results on the node. Every Stride measuring node (an output node with a "report" output and no loss
// output, e.g. Stride Reference Metrics, Stride Image Diversity, Stride Compare Results) shows its result as a
// compact table below its widgets; with several rows (labels) the rows are side by side and each cell carries a bar
// from the lowest to the highest value of its line, a small chart to compare them at a glance (none where all are
// equal).
//
// What the table reads (nodes/results.py sends it as the node's UI output, on "executed", also for a cached
// run; after a page reload it is read back from the server's /history):
//   stride_table: [{label, column: value, ...}, ...]    stride_columns: [{key, help}]  (help: a cell's tooltip)
// A figure with a 95% interval comes with its half-width as "<key>_pm" (distill_core.reference.metrics.flatten);
// the table shows it in the figure's cell, "value ± half-width".
import { app } from "../../scripts/app.js";
import { latestOutput } from "./stride_history.js";

export const RESULTS_HEIGHT = 200; // the table's height on the node; scripts/workflow_builder.py reads this line
export const COMPARE_HEIGHT = 300; // the same on Stride Compare Results (several reports); read there too
const COMPARE = "StrideCompareResults";
const TABLE = "stride_table";
const COLUMNS = "stride_columns";
const INTERVAL = "_pm";
const PACK_MODULE = `custom_nodes.${decodeURIComponent(new URL(import.meta.url).pathname.split("/").slice(-2, -1)[0])}`;

/** A measuring node: one of this pack's output nodes with a "report" output (a trainer, with a loss output, is not). */
function isMeasuring(nodeData) {
  return nodeData.output_node && nodeData.python_module === PACK_MODULE && (nodeData.output_name || []).includes("report")
    && !(nodeData.output || []).includes("STRIDE_LOSS");
}

/** A figure with its 95% half-width: the half-width to 2 significant digits and the value to the same decimal. */
function figure(value, pm) {
  if (typeof value !== "number" || typeof pm !== "number" || !Number.isFinite(pm) || pm <= 0) return cell(value);
  const decimals = Math.min(8, Math.max(0, 1 - Math.floor(Math.log10(pm))));
  return `${value.toFixed(decimals)} ± ${pm.toFixed(decimals)}`;
}

function cell(value) {
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    const a = Math.abs(value);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? value.toExponential(2) : String(Number(value.toPrecision(4)));
  }
  if (value && typeof value === "object") return JSON.stringify(value);
  return value == null ? "–" : String(value);
}

class ResultsTable {
  constructor(node) {
    this.node = node;
    this.rows = [];
    this.element = document.createElement("div");
    this.element.className = "stride-results";
    Object.assign(this.element.style, {
      width: "100%", height: "100%", overflow: "auto", boxSizing: "border-box", padding: "4px 6px",
      background: "#1e1e1e", borderRadius: "4px", font: "11px sans-serif", color: "#ddd",
    });
    this.show([], []);
  }

  show(rows, columns) {
    this.rows = rows;
    const help = Object.fromEntries((columns || []).map((c) => [c.key, c.help]));
    this.element.replaceChildren();
    if (!rows.length) {
      this.element.textContent = "no result yet: run the workflow";
      this.element.style.color = "#888";
      return;
    }
    this.element.style.color = "#ddd";
    const all = new Set(rows.flatMap((row) => Object.keys(row)));
    const interval = (key) => key.endsWith(INTERVAL) && all.has(key.slice(0, -INTERVAL.length));
    const keys = [...all].filter((key) => key !== "label" && !interval(key));
    const table = document.createElement("table");
    Object.assign(table.style, { borderCollapse: "collapse", width: "100%" });
    const head = table.insertRow();
    for (const text of ["", ...rows.map((row) => row.label ?? "")]) {
      const th = document.createElement("th");
      th.textContent = text;
      Object.assign(th.style, { textAlign: text ? "right" : "left", padding: "1px 4px", color: "#9cf",
                                fontWeight: "600", borderBottom: "1px solid #444" });
      head.append(th);
    }
    for (const key of keys) {
      const tr = table.insertRow();
      tr.dataset.key = key;
      const name = tr.insertCell();
      name.textContent = key;
      const tip = (help[key] || "") + (all.has(key + INTERVAL) ? " (± the 95% interval's half-width)" : "");
      name.title = tip;
      Object.assign(name.style, { padding: "1px 4px", color: "#bbb", whiteSpace: "nowrap" });
      const numbers = rows.map((row) => row[key]).filter((v) => typeof v === "number" && Number.isFinite(v));
      const lo = Math.min(...numbers), hi = Math.max(...numbers); // bars span the row's range: the lowest is short
      for (const row of rows) {
        const td = tr.insertCell();
        td.textContent = figure(row[key], row[key + INTERVAL]);
        td.title = tip;
        Object.assign(td.style, { padding: "1px 4px", textAlign: "right", whiteSpace: "nowrap" });
        const value = row[key];
        if (rows.length > 1 && typeof value === "number" && Number.isFinite(value) && hi > lo) {
          const width = 8 + (92 * (value - lo)) / (hi - lo);
          td.style.background = `linear-gradient(to left, rgba(111,168,255,0.35) ${width}%, transparent ${width}%)`;
          td.dataset.bar = width.toFixed(1);
        }
      }
    }
    this.element.append(table);
  }
}

app.registerExtension({
  name: "stride.results",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isMeasuring(nodeData)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      const table = new ResultsTable(this);
      const height = nodeData.name === COMPARE ? COMPARE_HEIGHT : RESULTS_HEIGHT;
      const widget = this.addDOMWidget("results", "stride_results", table.element, {
        serialize: false, hideOnZoom: false, getMinHeight: () => height, getMaxHeight: () => height,
      });
      widget.serialize = false;
      this.strideResults = table;
      return result;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      executed?.apply(this, arguments);
      if (output?.[TABLE]) this.strideResults?.show(output[TABLE], output[COLUMNS]);
    };
  },
  async loadedGraphNode(node) {
    if (!node.strideResults || node.strideResults.rows.length) return;
    const output = await latestOutput(node, TABLE);
    if (output && !node.strideResults.rows.length) node.strideResults.show(output[TABLE], output[COLUMNS]);
  },
});
