"use strict";
// The status page: one report from /api/v1/swarm, then live updates from /api/v1/events
// (server-sent events). Peer-supplied text (names, event details) only ever goes in as textContent.
(function () {
  const charts = window.SwarmCharts;
  const state = {
    report: null,
    series: new Map(), // key -> {key, run_id, kind, label, points}
    lastMessage: 0, // performance.now() of the last thing heard from the server
    tick: null, // the server's last freshness tick
    fresh: new Set(), // keys of events that arrived live, highlighted
    source: null,
  };
  const MAX_POINTS = 600;

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "className") node.className = value;
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
    }
    return node;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    if (typeof value !== "number") return String(value);
    if (Math.abs(value) >= 1e6) return (value / 1e6).toFixed(1) + " M";
    if (Math.abs(value) >= 1e4) return (value / 1e3).toFixed(1) + " k";
    return value.toFixed(digits === undefined ? 0 : digits);
  }

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 60) return `${seconds.toFixed(1)} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    return `${(seconds / 3600).toFixed(1)} h ago`;
  }

  function eventKey(e) {
    return `${e.run_id}|${e.event}|${e.subject}|${Math.round(e.at)}`;
  }

  // ---- data in ------------------------------------------------------------------------------

  function takeSeries(list, partial) {
    if (!partial) state.series.clear();
    for (const s of list || []) {
      const known = state.series.get(s.key);
      if (!known || !partial) {
        state.series.set(s.key, { ...s, points: s.points.slice(-MAX_POINTS) });
        continue;
      }
      for (const p of s.points) {
        const last = known.points[known.points.length - 1];
        if (!last || p[1] !== last[1] || p[0] > last[0]) known.points.push(p);
      }
      if (known.points.length > MAX_POINTS) known.points.splice(0, known.points.length - MAX_POINTS);
    }
  }

  function takeReport(report) {
    state.report = report;
    state.tick = { now: report.now, data_age_s: report.data_age_s, stale: report.stale, read_error: report.read_error,
      read_s: report.read_s, stale_after_s: report.stale_after_s };
    takeSeries(report.series, report.series_partial);
    heard();
    render();
  }

  function heard() {
    state.lastMessage = performance.now();
  }

  function connect() {
    if (!window.EventSource) return;
    const source = new EventSource("/api/v1/events");
    state.source = source;
    source.addEventListener("swarm", (m) => takeReport(JSON.parse(m.data)));
    source.addEventListener("tick", (m) => { state.tick = JSON.parse(m.data); heard(); renderFreshness(); });
    const live = (m) => {
      const e = JSON.parse(m.data);
      state.fresh.add(eventKey(e));
      if (state.report) {
        state.report.events.push(e);
        renderEvents();
      }
      heard();
    };
    source.addEventListener("membership", live);
    source.addEventListener("event", live);
  }

  async function poll() {
    // The fallback when the live stream is silent: one plain read of the report.
    try {
      const response = await fetch("/api/v1/swarm", { cache: "no-store" });
      if (response.ok) takeReport(await response.json());
    } catch (error) {
      // the server is gone: the stale mark says so
    }
  }

  // ---- rendering ----------------------------------------------------------------------------

  function staleAfter() {
    return Math.max(10, (state.tick && state.tick.stale_after_s) || 10);
  }

  function renderFreshness() {
    const banner = document.getElementById("stale");
    const silent = (performance.now() - state.lastMessage) / 1000;
    let text = "";
    if (!state.lastMessage) text = "stale: no data from the status server yet";
    else if (silent > staleAfter()) text = `stale: nothing from the status server for ${silent.toFixed(0)} s (connection lost?)`;
    else if (state.tick && state.tick.stale) {
      const age = state.tick.data_age_s === null ? "ever" : `${state.tick.data_age_s.toFixed(0)} s`;
      text = `stale: the status server has not read the swarm for ${age}` +
        (state.tick.read_error ? ` (${state.tick.read_error})` : "");
    }
    banner.hidden = !text;
    banner.textContent = text;
    document.body.classList.toggle("is-stale", Boolean(text));
    document.getElementById("headline").dataset.stale = text ? "true" : "false";
    document.getElementById("headline-state").textContent =
      state.report ? (text ? `last known: ${state.report.headline.state}` : state.report.headline.state) : "loading";
    const meta = document.getElementById("meta");
    if (state.report) {
      // the data's age as the server last said it, plus the time we have not heard from it since
      const age = state.tick && state.tick.data_age_s !== null ? state.tick.data_age_s + Math.max(0, silent) : null;
      meta.textContent = `${state.report.runs.length} run(s), ${state.report.nodes.length} node(s) · read ` +
        `${ago(age)}` +
        `${state.tick && state.tick.read_s ? ` (took ${state.tick.read_s.toFixed(1)} s)` : ""} · updates every ` +
        `${fmt(state.report.refresh_s, 1)} s`;
    }
  }

  function render() {
    const report = state.report;
    const headline = document.getElementById("headline");
    headline.dataset.state = report.headline.state;
    const reasons = document.getElementById("headline-reasons");
    reasons.replaceChildren(...report.headline.reasons.map((r) => h("li", {}, r)));
    const runs = document.getElementById("runs");
    runs.replaceChildren(...report.runs.map(renderRun));
    if (!report.runs.length) runs.appendChild(h("section", { className: "card muted" }, "no runs found in this swarm yet"));
    renderEvents();
    renderFreshness();
  }

  function renderRun(run) {
    const card = h("section", { className: "card run", "data-run-id": run.run_id, "data-health": run.health.state });
    card.appendChild(h("div", { className: "run-head" },
      h("h2", {}, run.name || "(unnamed run)"),
      h("span", { className: `badge ${run.health.state}` }, run.health.state),
      h("span", {}, `mode ${run.mode} · ${run.access}`),
      h("span", { className: "id" }, run.run_id)));
    if (run.health.reasons.length) card.appendChild(h("div", { className: "muted" }, run.health.reasons.join("; ")));
    const p = run.progress;
    if (p) {
      card.appendChild(h("div", { className: "progress-line" }, "iteration ", h("b", {}, `${fmt(p.iteration)} / ${p.steps}`),
        " · loss ", h("b", {}, fmt(p.loss, 3)), " · ", h("b", {}, fmt(p.tokens_per_s)), " tokens/s over the data nodes"));
    }
    if (run.zo) {
      const z = run.zo;
      card.appendChild(h("div", { className: "progress-line" }, "step ", h("b", {}, `${fmt(z.step)} / ${z.steps}`),
        " · validation loss ", h("b", {}, fmt(z.val_loss, 3)), ` · ${z.nodes} replicas (min ${z.min_nodes}) · `,
        h("b", {}, fmt(z.payload_bytes_per_step)), " payload bytes per step, ",
        h("b", {}, fmt(z.bytes_per_step)), " bytes per step on the wire (per node)"));
    }
    if (run.coverage) {
      card.appendChild(h("h3", {}, "Stage coverage"));
      const wrap = h("div", { className: "coverage" });
      const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      charts.coverageMap(svg, run.coverage);
      wrap.appendChild(svg);
      card.appendChild(wrap);
      card.appendChild(h("div", { className: "legend" },
        ...["ONLINE", "JOINING", "LEAVING", "DEAD"].map((s) => h("span", {}, h("i", { className: s }), s.toLowerCase())),
        h("span", {}, h("i", { className: "lost" }), "lost stage"), h("span", {}, h("i", { className: "recovering" }), "being restored"),
        h("span", {}, `${run.coverage.spares} spare(s)`)));
    }
    if (run.experts.length) card.appendChild(renderExperts(run.experts));
    card.appendChild(renderCharts(run));
    card.appendChild(h("h3", {}, "Nodes"));
    card.appendChild(renderNodes(state.report.nodes.filter((n) => n.run_id === run.run_id)));
    return card;
  }

  function renderExperts(experts) {
    const rows = experts.map((e) => h("tr", { "data-expert": e.name, "data-state": e.state },
      h("td", {}, e.name), h("td", {}, h("span", { className: `badge ${e.state}` }, e.state)),
      h("td", {}, h("progress", { max: 1, value: e.progress === null ? 0 : e.progress })),
      h("td", { className: "num" }, e.steps ? `${fmt(e.step)} / ${e.steps}` : fmt(e.step)),
      h("td", { className: "num" }, fmt(e.loss, 3)), h("td", {}, e.node_names.join(", ") || "–")));
    return h("div", {}, h("h3", {}, "Experts"), h("div", { className: "table-wrap" }, h("table", { className: "experts" },
      h("thead", {}, h("tr", {}, ...["expert", "state", "progress", "step", "loss", "trained by"].map((t) => h("th", {}, t)))),
      h("tbody", {}, ...rows))));
  }

  function renderCharts(run) {
    const kinds = [["pipeline", "Pipeline training loss (data nodes)"], ["expert", "Loss per expert"], ["zo", "ZO validation loss"]];
    const wanted = kinds.filter(([kind]) => (kind === "pipeline" && run.mode === "pipeline") || (kind === "zo" && run.mode === "zo")
      || (kind === "expert" && run.experts.length) || [...state.series.values()].some((s) => s.run_id === run.run_id && s.kind === kind));
    const box = h("div", {}, h("h3", {}, "Loss over time"));
    const grid = h("div", { className: "charts" });
    for (const [kind, title] of wanted) {
      const series = [...state.series.values()].filter((s) => s.run_id === run.run_id && s.kind === kind);
      const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("data-chart", kind);
      charts.lineChart(svg, series, { empty: "no losses reported yet" });
      grid.appendChild(h("div", { className: "chart" }, h("h4", {}, title), svg));
    }
    box.appendChild(grid);
    return box;
  }

  function renderNodes(nodes) {
    const head = ["name", "id", "role", "stage / expert", "device", "throughput", "version", "reach", "state", "last seen", "step", "loss"];
    const rows = nodes.map((n) => {
      const where = n.stage !== null ? `stage ${n.stage}` : n.expert || "–";
      const loss = n.metrics.loss !== undefined ? n.metrics.loss : n.metrics.val_loss;
      return h("tr", { className: `state-${n.state}`, "data-node-id": n.id, "data-state": n.state, title: n.dead_reason || null },
        h("td", { className: "name" }, n.public_name || "–"), h("td", { className: "mono" }, n.id.slice(0, 12)),
        h("td", {}, n.role), h("td", {}, where), h("td", {}, n.device), h("td", { className: "num" }, fmt(n.throughput)),
        h("td", {}, n.version), h("td", {}, n.reachability),
        h("td", {}, h("span", { className: `badge ${n.state}` }, n.state.toLowerCase()),
          n.dead_reason ? h("span", { className: "muted" }, ` ${n.dead_reason}`) : null),
        h("td", { className: "num" }, ago(n.last_seen_s)), h("td", { className: "num" }, fmt(n.step)),
        h("td", { className: "num" }, fmt(loss, 3)));
    });
    return h("div", { className: "table-wrap" }, h("table", { className: "nodes" },
      h("thead", {}, h("tr", {}, ...head.map((t) => h("th", {}, t)))), h("tbody", {}, ...rows)));
  }

  function renderEvents() {
    const list = document.getElementById("events");
    const seen = new Set();
    const events = [];
    for (const e of state.report.events.slice().sort((a, b) => b.at - a.at)) {
      const key = eventKey(e);
      if (seen.has(key)) continue;
      seen.add(key);
      events.push(e);
    }
    if (!events.length) {
      list.replaceChildren(h("li", { className: "empty" }, "no events yet"));
      return;
    }
    list.replaceChildren(...events.slice(0, 200).map((e) => {
      let detail = e.detail;
      if (e.event === "recovery" && e.method && !detail.includes(e.method)) detail += ` (${e.method})`;
      return h("li", { className: state.fresh.has(eventKey(e)) ? "fresh" : null, "data-event": e.event },
        h("span", { className: "time" }, charts.clock(e.at)), h("span", { className: `ev-${e.event}` }, e.event.replace("_", " ")),
        h("span", {}, detail));
    }));
  }

  function start() {
    poll();
    connect();
    setInterval(() => {
      renderFreshness();
      if ((performance.now() - state.lastMessage) / 1000 > staleAfter()) poll();
    }, 1000);
  }

  start();
})();
