// Stride: a live loss chart on every node that outputs STRIDE_LOSS (e.g. "Stride Distill LoRA").
//
// One panel per loss series (a node with phases, such as DMD's generator and fake score, sends one series
// per phase), each with x/y axes and ticks, the raw loss and its smoothed value (EMA, exponential moving
// average), a log-scale toggle, and a caption with the step and the time left (or the run's duration).
//
// What the chart reads (the node sends it, from distill_core/training/progress.py; the chart only draws):
//  - live, one websocket event per optimizer step, "stride.distill.loss":
//      {node, step, steps, losses: {series: value}, ema: {series: value}, eta_s, elapsed_s}
//    node = the node's UNIQUE_ID; a series without a value this step is null or left out; ema, eta_s and
//    elapsed_s are optional; {node, step, steps, loss} means one series "loss". A resumed run's first event
//    may carry "history": the losses of the steps before it, [{series: value}, ...] from step 1. A step at
//    or below the last one shown starts a new run.
//  - the whole history as the node's UI output "stride_loss" (sent on "executed", also for a cached run):
//      stride_loss: [{steps, first_step, elapsed_s, losses: {series: [value per step]}, ema: {series: [...]}}]
//  - after a page reload: the newest entry of the server's /history for this workflow and node that has
//    such a UI output.
//  - a long phase before or between the steps (the data-free teacher pool, the headless export), one event per
//    unit of work, "stride.distill.phase": {node, phase, done, total, unit}: shown in the caption while it runs.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { latestOutput } from "./stride_history.js";

export const CHART_HEIGHT = 220; // per loss output; scripts/workflow_builder.py reads this line
const LOSS_TYPE = "STRIDE_LOSS";
const EVENT = "stride.distill.loss";
const HISTORY_EVENT = "stride.distill.history";
const PHASE_EVENT = "stride.distill.phase";
const UI_KEY = "stride_loss";
const LOG_PROPERTY = "stride_loss_log_scale";
const CAPTION = 20; // px for the caption line and the toggle above the panels
const PAD = { left: 46, right: 10, top: 18, bottom: 28 }; // top: the legend line
const COLORS = { raw: "rgba(111,168,255,0.45)", ema: "#ffb347", axis: "#888", grid: "#333", text: "#ddd" };

/** Loss-output names of a node definition, in output order (the phases). */
function lossPhases(nodeData) {
  const phases = [];
  (nodeData.output || []).forEach((type, i) => {
    if (type === LOSS_TYPE) phases.push((nodeData.output_name || [])[i] || `loss ${phases.length + 1}`);
  });
  return phases;
}

/** "1m 05s" for seconds. */
function duration(seconds) {
  if (!Number.isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(r).padStart(2, "0")}s`;
  return `${r}s`;
}

function fmt(value, digits = 3) {
  if (!Number.isFinite(value)) return "–";
  const a = Math.abs(value);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return value.toExponential(digits - 1).replace(/\.?0+e/, "e");
  return String(Number(value.toPrecision(digits)));
}

/** Ticks at 1, 2 or 5 times a power of ten covering [lo, hi]. */
function linearTicks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / Math.max(1, count);
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((k) => k * power).find((s) => s >= raw) || 10 * power;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

/** Ticks at powers of ten inside [lo, hi] (values, not logs); 1-2-5 steps when the range is within a decade. */
function logTicks(lo, hi) {
  const ticks = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
    for (const k of [1, 2, 5]) {
      const v = k * 10 ** e;
      if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) ticks.push(v);
    }
  }
  const decades = ticks.filter((v) => Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-9);
  return decades.length >= 2 ? decades : ticks;
}

class LossChart {
  constructor(node, phases) {
    this.node = node;
    this.phaseNames = phases.length ? phases : ["loss"];
    this.phases = new Map(); // series name -> {steps, points: [{step, loss, ema}], eta_s, elapsed_s, done}
    this.lastStep = 0;
    this.drawn = []; // per panel: {phase, points, xTicks, yTicks, log} (read by the browser tests)

    this.element = document.createElement("div");
    this.element.className = "stride-loss-chart";
    Object.assign(this.element.style, {
      display: "flex", flexDirection: "column", width: "100%", height: "100%", boxSizing: "border-box",
      background: "#1e1e1e", borderRadius: "4px", overflow: "hidden", font: "11px sans-serif", color: COLORS.text,
    });
    const head = document.createElement("div");
    Object.assign(head.style, { display: "flex", alignItems: "flex-start", gap: "6px", padding: "3px 6px 0 6px",
                                height: `${CAPTION}px`, boxSizing: "border-box" });
    this.caption = document.createElement("div");
    this.caption.className = "stride-loss-caption";
    Object.assign(this.caption.style, { flex: "1", lineHeight: "16px", whiteSpace: "nowrap", overflow: "hidden",
                                        textOverflow: "ellipsis" });
    const toggle = document.createElement("label");
    Object.assign(toggle.style, { whiteSpace: "nowrap", cursor: "pointer", pointerEvents: "auto" });
    this.logBox = document.createElement("input");
    this.logBox.type = "checkbox";
    this.logBox.className = "stride-loss-log";
    this.logBox.checked = node.properties?.[LOG_PROPERTY] ?? true;
    this.logBox.addEventListener("change", () => {
      node.properties = node.properties || {};
      node.properties[LOG_PROPERTY] = this.logBox.checked;
      this.draw();
    });
    toggle.append(this.logBox, document.createTextNode(" log scale"));
    head.append(this.caption, toggle);
    this.canvas = document.createElement("canvas");
    Object.assign(this.canvas.style, { flex: "1", width: "100%", minHeight: "0", pointerEvents: "none" });
    this.element.append(head, this.canvas);
    new ResizeObserver(() => this.draw()).observe(this.canvas);
  }

  get log() {
    return this.logBox.checked;
  }

  phase(name) {
    if (!this.phases.has(name)) this.phases.set(name, { steps: 0, points: [] });
    return this.phases.get(name);
  }

  /** One live step. */
  add(detail) {
    this.currentStage = null; // steps run: no long phase is in progress
    if (detail.history || detail.step <= this.lastStep) this.phases.clear();
    (detail.history || []).forEach((losses, index) => this.addStep(index + 1, detail.steps, losses, {}));
    const losses = detail.losses ?? { [this.phaseNames[0]]: detail.loss };
    this.addStep(detail.step, detail.steps, losses, detail.ema || {});
    for (const series of this.phases.values()) Object.assign(series, { eta_s: detail.eta_s, elapsed_s: detail.elapsed_s });
    this.draw();
  }

  addStep(step, steps, losses, ema) {
    for (const [name, loss] of Object.entries(losses)) {
      const series = this.phase(name);
      if (Number.isFinite(loss)) series.points.push({ step, loss, ema: ema[name] });
      Object.assign(series, { steps, done: step >= steps });
      this.lastUpdated = series;
    }
    this.lastStep = step;
  }

  /** A long phase's progress (the teacher pool, an export): shown in the caption until it is done; each phase's
   *  latest count is kept on the canvas, e.g. {"teacher data pool": "8/8"} (read by the browser tests). */
  stage(detail) {
    this.currentStage = detail;
    const counts = JSON.parse(this.canvas.dataset.phases || "{}");
    counts[detail.phase] = `${detail.done}/${detail.total}`;
    this.canvas.dataset.phases = JSON.stringify(counts);
    this.caption.textContent = this.captionText();
  }

  /** A whole history (the node's UI output): replaces what is shown. */
  load(history) {
    this.phases.clear();
    for (const entry of history || []) {
      const first = entry.first_step ?? 1;
      for (const [name, values] of Object.entries(entry.losses || {})) {
        const series = this.phase(name);
        values.forEach((loss, i) => {
          if (Number.isFinite(loss)) series.points.push({ step: first + i, loss, ema: entry.ema?.[name]?.[i] });
        });
        const last = first + values.length - 1;
        Object.assign(series, { steps: entry.steps ?? last, elapsed_s: entry.elapsed_s, eta_s: 0,
                                done: last >= (entry.steps ?? last) });
        this.lastUpdated = series;
        this.lastStep = last;
      }
    }
    this.draw();
  }

  /** One line: where the run is (the phase updated last) and the time left, or how long it took. */
  captionText() {
    const stage = this.currentStage;
    if (stage && stage.done < stage.total) return `${stage.phase}: ${stage.done}/${stage.total} ${stage.unit}`;
    const series = this.lastUpdated;
    const last = series?.points[series.points.length - 1];
    if (!last) return "no run yet: the chart follows the next run";
    if (series.done) {
      const took = Number.isFinite(series.elapsed_s) ? ` in ${duration(series.elapsed_s)}` : "";
      return `done: ${last.step} steps${took}`;
    }
    const eta = Number.isFinite(series.eta_s) ? `  ·  ETA ${duration(series.eta_s)}` : "";
    return `step ${last.step}/${series.steps}${eta}`;
  }

  /** The declared phases (one per loss output), and any other phase the node sends; the declared ones
   *  give way when data arrive for none of them (a node with one loss output that names its phases). */
  panelNames() {
    const sent = [...this.phases.keys()].filter((name) => this.phases.get(name).points.length);
    const declared = this.phaseNames.some((name) => sent.includes(name)) || !sent.length ? this.phaseNames : [];
    return [...declared, ...sent.filter((name) => !declared.includes(name))];
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    this.caption.textContent = this.captionText();
    if (!width || !height) return;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const names = this.panelNames();
    const panelHeight = height / names.length;
    this.drawn = names.map((name, i) => this.drawPanel(ctx, name, 0, i * panelHeight, width, panelHeight));
    canvas.dataset.points = String(this.drawn.reduce((sum, panel) => sum + panel.points, 0));
  }

  drawPanel(ctx, name, x0, y0, width, height) {
    const series = this.phases.get(name) || { steps: 0, points: [] };
    const log = this.log;
    const left = x0 + PAD.left, right = x0 + width - PAD.right;
    const top = y0 + PAD.top, bottom = y0 + height - PAD.bottom;
    const usable = series.points.filter((p) => Number.isFinite(p.loss) && (!log || p.loss > 0));
    const values = usable.flatMap((p) => [p.loss, ...(Number.isFinite(p.ema) && (!log || p.ema > 0) ? [p.ema] : [])]);
    let lo = values.length ? Math.min(...values) : log ? 0.01 : 0;
    let hi = values.length ? Math.max(...values) : 1;
    if (log) {
      if (hi / lo < 10) { const mid = Math.sqrt(hi * lo); lo = mid / Math.sqrt(10); hi = mid * Math.sqrt(10); }
    } else if (hi - lo < 1e-12) { lo -= 0.5 * (Math.abs(lo) || 1); hi += 0.5 * (Math.abs(hi) || 1); }
    const first = usable.length ? usable[0].step : 1;
    const stepMax = Math.max(series.steps || 0, usable.length ? usable[usable.length - 1].step : 1, first + 1);
    const xOf = (step) => left + ((right - left) * (step - first)) / Math.max(stepMax - first, 1);
    const yOf = log
      ? (v) => bottom - ((bottom - top) * (Math.log10(v) - Math.log10(lo))) / (Math.log10(hi) - Math.log10(lo))
      : (v) => bottom - ((bottom - top) * (v - lo)) / (hi - lo);

    const xTicks = linearTicks(first, stepMax, Math.max(2, Math.floor((right - left) / 70)))
      .filter((t) => t >= first && t <= stepMax && Number.isInteger(t));
    const yTicks = log ? logTicks(lo, hi) : linearTicks(lo, hi, Math.max(2, Math.floor((bottom - top) / 28)));
    ctx.font = "10px sans-serif";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const t of yTicks) {
      const y = Math.round(yOf(t)) + 0.5;
      if (y < top - 1 || y > bottom + 1) continue;
      ctx.strokeStyle = COLORS.grid;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(right, y); ctx.stroke();
      ctx.fillStyle = COLORS.text;
      ctx.fillText(fmt(t, 2), left - 4, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const t of xTicks) {
      const x = Math.round(xOf(t)) + 0.5;
      ctx.strokeStyle = COLORS.axis;
      ctx.beginPath(); ctx.moveTo(x, bottom); ctx.lineTo(x, bottom + 4); ctx.stroke();
      ctx.fillStyle = COLORS.text;
      ctx.fillText(String(t), x, bottom + 6);
    }
    ctx.strokeStyle = COLORS.axis;
    ctx.beginPath(); ctx.moveTo(left + 0.5, top); ctx.lineTo(left + 0.5, bottom + 0.5); ctx.lineTo(right, bottom + 0.5);
    ctx.stroke();
    ctx.fillStyle = COLORS.text;
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText("step", left + 2, bottom + 16);

    const line = (key, color, widthPx) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = widthPx;
      ctx.beginPath();
      let started = false;
      for (const p of usable) {
        const v = p[key];
        if (!Number.isFinite(v) || (log && v <= 0)) continue;
        const x = xOf(p.step), y = yOf(v);
        if (started) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        started = true;
      }
      ctx.stroke();
    };
    ctx.save();
    ctx.beginPath(); ctx.rect(left, top - 1, right - left + 1, bottom - top + 2); ctx.clip();
    line("loss", COLORS.raw, 1);
    line("ema", COLORS.ema, 2);
    ctx.restore();
    const last = usable[usable.length - 1];
    let x = left + 2;
    const text = (words, color) => {
      ctx.fillStyle = color;
      ctx.fillText(words, x, y0 + 3);
      x += ctx.measureText(words).width + 8;
    };
    ctx.textAlign = "left";
    ctx.font = "11px sans-serif";
    if (this.panelNames().length > 1) text(name, COLORS.text);
    if (last && this.panelNames().length > 1) text(`${last.step}/${series.steps}`, COLORS.text);
    text(`raw ${last ? fmt(last.loss) : "–"}`, COLORS.raw.replace("0.45", "1"));
    text(`EMA ${last && Number.isFinite(last.ema) ? fmt(last.ema) : "–"}`, COLORS.ema);
    return { phase: name, points: usable.length, xTicks, yTicks, log };
  }
}

app.registerExtension({
  name: "stride.lossChart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const phases = lossPhases(nodeData);
    if (!phases.length) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      const chart = new LossChart(this, phases);
      const height = CHART_HEIGHT * phases.length;
      const widget = this.addDOMWidget("loss_chart", "stride_loss_chart", chart.element, {
        serialize: false, hideOnZoom: false, getMinHeight: () => height, getMaxHeight: () => height,
      });
      widget.serialize = false;
      this.strideLossChart = chart;
      chart.draw();
      return result;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      executed?.apply(this, arguments);
      if (output?.[UI_KEY]) this.strideLossChart?.load(output[UI_KEY]);
    };
  },
  async loadedGraphNode(node) {
    const chart = node.strideLossChart;
    if (!chart || chart.phases.size) return;
    const output = await latestOutput(node, UI_KEY);
    if (output && !chart.phases.size) chart.load(output[UI_KEY]);
  },
  async setup() {
    // The node id is not final while a node is being created: find the node by id when an event arrives.
    const chartOf = (id) => app.graph?.getNodeById(Number(id))?.strideLossChart;
    api.addEventListener(EVENT, ({ detail }) => chartOf(detail.node)?.add(detail));
    api.addEventListener(HISTORY_EVENT, ({ detail }) => chartOf(detail.node)?.load(detail[UI_KEY]));
    api.addEventListener(PHASE_EVENT, ({ detail }) => chartOf(detail.node)?.stage(detail));
  },
});
