"use strict";
// Self-written SVG drawing for the status page: line charts and the stage coverage map.
// No third-party code; every text goes in through textContent, never as markup.
(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2f6fd6", "#d9730d", "#1f9d55", "#9b51e0", "#d64545", "#0f9fb4", "#8a6d3b", "#e0589b"];
  const STATE_FILL = { ONLINE: "#1f9d55", JOINING: "#d99a06", LEAVING: "#8a94a6", DEAD: "#d64545" };

  function el(tag, attrs, parent, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  // About `count` round tick values covering [lo, hi].
  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
    return ticks;
  }

  function clock(t) {
    const d = new Date(t * 1000);
    return d.toTimeString().slice(0, 8);
  }

  // series: [{label, points: [[time, step, value], ...]}]; x is time, y the value.
  function lineChart(svg, series, options) {
    const W = 560, H = 220, left = 46, right = 12, top = 12, bottom = 28;
    clear(svg);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("role", "img");
    const all = series.flatMap((s) => s.points);
    if (!all.length) {
      el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty-text" }, svg,
        (options && options.empty) || "no data yet");
      return;
    }
    let [t0, t1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [v0, v1] = [Math.min(...all.map((p) => p[2])), Math.max(...all.map((p) => p[2]))];
    if (t1 - t0 < 1) { t0 -= 0.5; t1 += 0.5; }
    if (v1 - v0 < 1e-6) { v0 -= 0.05; v1 += 0.05; }
    const pad = (v1 - v0) * 0.08;
    v0 -= pad; v1 += pad;
    const x = (t) => left + ((t - t0) / (t1 - t0)) * (W - left - right);
    const y = (v) => top + (1 - (v - v0) / (v1 - v0)) * (H - top - bottom);
    for (const v of niceTicks(v0, v1, 4)) {
      el("line", { x1: left, x2: W - right, y1: y(v), y2: y(v), class: "gridline" }, svg);
      el("text", { x: left - 6, y: y(v) + 3, "text-anchor": "end", class: "axis-text" }, svg, v.toFixed(Math.abs(v) < 10 ? 2 : 1));
    }
    const span = t1 - t0;
    const tickStep = niceTicks(0, span, 4)[1] || span;
    for (let t = Math.ceil(t0 / tickStep) * tickStep; t <= t1; t += tickStep) {
      el("line", { x1: x(t), x2: x(t), y1: top, y2: H - bottom, class: "gridline" }, svg);
      el("text", { x: x(t), y: H - bottom + 14, "text-anchor": "middle", class: "axis-text" }, svg, clock(t));
    }
    el("line", { x1: left, x2: left, y1: top, y2: H - bottom, stroke: "#9aa3b2" }, svg);
    el("line", { x1: left, x2: W - right, y1: H - bottom, y2: H - bottom, stroke: "#9aa3b2" }, svg);
    series.forEach((s, i) => {
      const color = PALETTE[i % PALETTE.length];
      const pts = s.points.map((p) => `${x(p[0]).toFixed(1)},${y(p[2]).toFixed(1)}`).join(" ");
      const line = el("polyline", { points: pts, stroke: color, class: "series-line", "data-series": s.key || s.label }, svg);
      const last = s.points[s.points.length - 1];
      el("title", {}, line, `${s.label}: ${last[2].toFixed(4)} at step ${last[1]}`);
      if (s.points.length === 1) el("circle", { cx: x(last[0]), cy: y(last[2]), r: 3, fill: color }, svg);
      const ly = top + 4 + i * 14;
      el("rect", { x: W - right - 130, y: ly, width: 10, height: 3, fill: color }, svg);
      el("text", { x: W - right - 116, y: ly + 5, class: "axis-text" }, svg,
        `${s.label.slice(0, 16)} ${last[2].toFixed(3)}`);
    });
  }

  // Stages as columns, replicas as rows; a stage with no live replica gets a dashed "lost" cell.
  function coverageMap(svg, coverage) {
    clear(svg);
    const stages = coverage.stages;
    const rows = Math.max(1, ...stages.map((s) => s.replicas.length + (s.state === "lost" || s.state === "recovering" ? 1 : 0)));
    const cw = 132, ch = 26, gap = 6, left = 4, top = 40;
    const W = left + stages.length * (cw + gap), H = top + rows * (ch + gap) + 4;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("width", W);
    stages.forEach((stage, i) => {
      const x0 = left + i * (cw + gap);
      const head = el("g", { class: "stage", "data-stage": stage.stage, "data-stage-state": stage.state }, svg);
      el("text", { x: x0 + cw / 2, y: 14, "text-anchor": "middle", class: "axis" }, head,
        stage.stage === 0 ? "stage 0 (data)" : `stage ${stage.stage}`);
      const summary = stage.state === "served" ? `${stage.online} online${stage.joining ? `, ${stage.joining} joining` : ""}`
        : stage.state.toUpperCase();
      el("text", { x: x0 + cw / 2, y: 30, "text-anchor": "middle", class: `axis t-${stage.state}` }, head, summary);
      stage.replicas.forEach((r, j) => {
        const y0 = top + j * (ch + gap);
        const cell = el("rect", { x: x0, y: y0, width: cw, height: ch, rx: 4, fill: STATE_FILL[r.state] || "#8a94a6",
          "data-node-id": r.id, "data-state": r.state }, head);
        el("title", {}, cell, `${r.public_name || r.id.slice(0, 12)}: ${r.state}`);
        el("text", { x: x0 + 8, y: y0 + 17, class: "cell-label" }, head,
          `${(r.public_name || r.id.slice(0, 10)).slice(0, 13)} ${r.state === "ONLINE" ? "" : r.state.toLowerCase()}`);
      });
      if (stage.state === "lost" || stage.state === "recovering") {
        const y0 = top + stage.replicas.length * (ch + gap);
        const color = stage.state === "lost" ? "#d64545" : "#2f6fd6";
        el("rect", { x: x0 + 1, y: y0 + 1, width: cw - 2, height: ch - 2, rx: 4, fill: "#fff", stroke: color,
          "stroke-width": 2, "stroke-dasharray": "5 3" }, head);
        el("text", { x: x0 + cw / 2, y: y0 + 17, "text-anchor": "middle", class: `axis t-${stage.state}` }, head,
          stage.state === "lost" ? "no live replica" : `restoring: ${(stage.recovering_by_name || "").slice(0, 10)}`);
      }
    });
  }

  window.SwarmCharts = { lineChart, coverageMap, clock };
})();
