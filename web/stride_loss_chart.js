// Stride: live loss chart on the "Stride Distill LoRA" node, fed by the server's
// "stride.distill.loss" websocket events ({node, step, steps, losses: {series: value}}).
// One line per series (lcm/tdd/segmented: "loss"; dmd: "generator" on generator steps and "fake"),
// log scale; a resumed run's first event carries the history of the steps before it ("history").
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "stride.distill.loss";
const NODE_TYPE = "StrideDistillLoRA";
const COLOURS = ["#6fa8ff", "#ffb347", "#7bd88f", "#ff6f91"];

function draw(chart) {
  const { canvas, points } = chart;
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 24;
  ctx.fillStyle = "#1e1e1e";
  ctx.fillRect(0, 0, w, h);
  ctx.strokeStyle = "#555";
  ctx.strokeRect(pad, 6, w - pad - 6, h - pad - 6);
  if (points.length < 2) return;
  const series = [...new Set(points.flatMap((p) => Object.keys(p.losses)))].sort();
  const logs = points.flatMap((p) => Object.values(p.losses).filter(Number.isFinite).map((v) => Math.log10(Math.max(v, 1e-12))));
  if (!logs.length) return;
  const lo = Math.min(...logs), hi = Math.max(...logs), span = hi - lo || 1;
  const last = points[points.length - 1];
  const legend = [];
  series.forEach((name, index) => {
    ctx.strokeStyle = COLOURS[index % COLOURS.length];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let started = false, latest = null;
    for (const p of points) {
      const value = p.losses[name];
      if (!Number.isFinite(value)) continue;
      const x = pad + ((w - pad - 6) * (p.step - 1)) / Math.max(last.steps - 1, 1);
      const y = 6 + ((h - pad - 12) * (hi - Math.log10(Math.max(value, 1e-12)))) / span;
      if (started) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      started = true;
      latest = value;
    }
    ctx.stroke();
    if (latest !== null) legend.push([name, latest, ctx.strokeStyle]);
  });
  ctx.font = "11px sans-serif";
  let x = pad + 4;
  ctx.fillStyle = "#ddd";
  const head = `step ${last.step}/${last.steps}`;
  ctx.fillText(head, x, h - 8);
  x += ctx.measureText(head).width + 8;
  for (const [name, value, colour] of legend) {
    ctx.fillStyle = colour;
    const text = `${name} ${value.toPrecision(4)}`;
    ctx.fillText(text, x, h - 8);
    x += ctx.measureText(text).width + 8;
  }
}

app.registerExtension({
  name: "stride.lossChart",
  async nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE) return;
    const canvas = document.createElement("canvas");
    canvas.width = 320;
    canvas.height = 140;
    canvas.className = "stride-loss-chart";
    node.addDOMWidget("loss_chart", "stride_loss_chart", canvas, { serialize: false });
    // The node id is not final yet (-1 while the node is being created): keep the chart on the node
    // and find the node by id when an event arrives.
    node.strideLossChart = { canvas, points: [] };
    draw(node.strideLossChart);
  },
  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node));
      const chart = node && node.strideLossChart;
      if (!chart) return;
      const previous = chart.points.length ? chart.points[chart.points.length - 1].step : 0;
      if (detail.history || detail.step === 1 || detail.step <= previous) {
        chart.points = (detail.history || []).map((losses, index) => ({ step: index + 1, steps: detail.steps, losses }));
      }
      chart.points.push({ step: detail.step, steps: detail.steps, losses: detail.losses });
      chart.canvas.dataset.points = String(chart.points.length);
      draw(chart);
    });
  },
});
