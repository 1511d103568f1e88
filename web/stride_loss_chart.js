// Stride: live loss chart on the "Stride Distill LoRA" node, fed by the server's
// "stride.distill.loss" websocket events ({node, step, steps, loss}); a long phase before or between
// the steps ("stride.distill.phase": {node, phase, done, total, unit}) is shown on its top line.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "stride.distill.loss";
const PHASE_EVENT = "stride.distill.phase";
const NODE_TYPE = "StrideDistillLoRA";

function draw(chart) {
  const { canvas, points } = chart;
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 24;
  ctx.fillStyle = "#1e1e1e";
  ctx.fillRect(0, 0, w, h);
  ctx.strokeStyle = "#555";
  ctx.strokeRect(pad, 6, w - pad - 6, h - pad - 6);
  const phase = chart.phase;
  if (phase && phase.done < phase.total) {
    ctx.fillStyle = "#ddd";
    ctx.font = "11px sans-serif";
    ctx.fillText(`${phase.phase}: ${phase.done}/${phase.total} ${phase.unit}`, pad + 4, 20);
  }
  if (points.length < 2) return;
  const logs = points.map((p) => Math.log10(Math.max(p.loss, 1e-12)));
  const lo = Math.min(...logs), hi = Math.max(...logs), span = hi - lo || 1;
  const last = points[points.length - 1];
  ctx.strokeStyle = "#6fa8ff";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach((p, i) => {
    const x = pad + ((w - pad - 6) * (p.step - 1)) / Math.max(last.steps - 1, 1);
    const y = 6 + ((h - pad - 12) * (hi - logs[i])) / span;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#ddd";
  ctx.font = "11px sans-serif";
  ctx.fillText(`step ${last.step}/${last.steps}  loss ${last.loss.toPrecision(4)}`, pad + 4, h - 8);
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
    api.addEventListener(PHASE_EVENT, ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node));
      const chart = node && node.strideLossChart;
      if (!chart) return;
      chart.phase = detail;
      // each phase's latest count, e.g. {"teacher data pool": "8/8"} (read by the browser test)
      const counts = JSON.parse(chart.canvas.dataset.phases || "{}");
      counts[detail.phase] = `${detail.done}/${detail.total}`;
      chart.canvas.dataset.phases = JSON.stringify(counts);
      draw(chart);
    });
    api.addEventListener(EVENT, ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node));
      const chart = node && node.strideLossChart;
      if (!chart) return;
      if (detail.step === 1 || (chart.points.length && detail.step <= chart.points[chart.points.length - 1].step)) {
        chart.points = [];
      }
      chart.points.push({ step: detail.step, steps: detail.steps, loss: detail.loss });
      chart.canvas.dataset.points = String(chart.points.length);
      draw(chart);
    });
  },
});
