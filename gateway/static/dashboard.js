// The tokenfleet dashboard: polls GET /v1/fleet and redraws. No build step; uPlot is the
// only library (vendored beside this file). With auth on, the page asks for an API key once
// and keeps it in this tab's sessionStorage; it is sent as "Authorization: Bearer <key>".
"use strict";

const POLL_MS = Number(new URLSearchParams(location.search).get("interval_ms")) || 2000;
const KEY_STORE = "tokenfleet.apiKey";
const MIN_CHART_BUCKETS = 24; // charts show at least the last 2 minutes (5 s buckets)

const $ = (id) => document.getElementById(id);
const charts = {};
let timer = null;

function apiKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  return `${s.toFixed(2)} s`;
}

function fmtUptime(s) {
  if (s === null || s === undefined) return "–";
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${sec}s`;
  return `${sec}s`;
}

function fmtNumber(x, digits = 0) {
  if (x === null || x === undefined) return "–";
  return Number(x).toLocaleString(undefined, { maximumFractionDigits: digits,
                                               minimumFractionDigits: digits });
}

function fmtClock(unix) {
  return unix ? new Date(unix * 1000).toLocaleTimeString() : "–";
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function pill(row, text) {
  const td = document.createElement("td");
  const span = document.createElement("span");
  span.className = `pill ${text}`;
  span.textContent = text;
  td.appendChild(span);
  row.appendChild(td);
}

function kvCell(row, worker) {
  const td = document.createElement("td");
  if (worker.kv_usage === null || worker.kv_usage === undefined) {
    td.textContent = "–";
  } else {
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.min(100, worker.kv_usage * 100).toFixed(1)}%`;
    bar.appendChild(fill);
    td.appendChild(bar);
    td.appendChild(document.createTextNode(
      `${(worker.kv_usage * 100).toFixed(0)}% of ${fmtNumber(worker.kv_tokens_budget)}`));
  }
  row.appendChild(td);
}

function fillTable(id, items, columns, emptyText) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  if (!items.length) {
    const row = body.insertRow();
    const td = cell(row, emptyText, "empty");
    td.colSpan = columns;
    return;
  }
  return body;
}

function renderWorkers(workers) {
  const body = fillTable("workers", workers, 8, "no live worker (the queue holds new requests)");
  if (!body) return;
  for (const w of workers) {
    const row = body.insertRow();
    row.dataset.workerId = w.id;
    cell(row, w.id);
    cell(row, w.model);
    cell(row, `${w.dtype || "–"} / ${w.quantization}`);
    pill(row, w.state);
    cell(row, fmtNumber(w.num_running), "num");
    cell(row, fmtNumber(w.num_waiting), "num");
    kvCell(row, w);
    cell(row, fmtUptime(w.uptime_s), "num");
  }
}

function renderQueues(models) {
  const rows = [];
  for (const m of models) for (const lane of m.lanes) rows.push([m, lane]);
  const body = fillTable("queues", rows, 7, "no model has queued anything yet");
  if (!body) return;
  for (const [m, lane] of rows) {
    const row = body.insertRow();
    row.dataset.model = m.name;
    row.dataset.lane = lane.lane;
    cell(row, m.name);
    cell(row, lane.lane);
    cell(row, fmtNumber(lane.lag), "num");
    cell(row, fmtNumber(lane.pending), "num");
    cell(row, fmtNumber(lane.depth), "num");
    cell(row, fmtNumber(m.dead_letters), "num");
    const s = m.scaler;
    const spares = s && s.standby ? ` + ${s.standby} standby` : "";
    cell(row, s ? `${s.workers} → ${s.desired}${spares} (${s.reason || ""})` : "–");
  }
}

function renderBatches(batches) {
  const section = $("batches-section");
  if (!Array.isArray(batches)) { section.hidden = true; return; }
  section.hidden = false;
  const body = fillTable("batches", batches, 5, "no batch in progress");
  if (!body) return;
  for (const b of batches) {
    const row = body.insertRow();
    cell(row, b.id);
    pill(row, b.status);
    cell(row, fmtNumber(b.completed), "num");
    cell(row, fmtNumber(b.failed), "num");
    cell(row, fmtNumber(b.total), "num");
  }
}

function renderJobs(unsorted) {
  const jobs = [...unsorted].sort((a, b) => b.finished_at - a.finished_at);
  const body = fillTable("jobs", jobs, 11, "no request finished in the last minutes");
  if (!body) return;
  for (const j of jobs) {
    const row = body.insertRow();
    row.dataset.jobId = j.id;
    cell(row, fmtClock(j.finished_at));
    cell(row, j.id);
    cell(row, j.model);
    cell(row, j.lane || "–");
    pill(row, j.finish_reason);
    cell(row, fmtSeconds(j.queue_s), "num");
    cell(row, fmtSeconds(j.ttft_s), "num");
    cell(row, fmtSeconds(j.total_s), "num");
    cell(row, fmtNumber(j.prompt_tokens), "num");
    cell(row, fmtNumber(j.completion_tokens), "num");
    cell(row, j.worker);
  }
}

function renderStats(fleet) {
  const ready = fleet.workers.filter((w) => w.state === "ready").length;
  $("stat-workers").textContent = `${ready} / ${fleet.workers.length}`;
  $("stat-queue").textContent = fmtNumber(fleet.models.reduce((n, m) => n + m.queue_depth, 0));
  $("stat-running").textContent =
    fmtNumber(fleet.models.reduce((n, m) => n + m.requests_running, 0));
  const s = fleet.summary;
  $("stat-tps").textContent = fmtNumber(s.gen_tokens_per_s, 1);
  $("stat-ttft").textContent = fmtSeconds(s.ttft_p50_s);
  $("stat-finished").textContent = fmtNumber(s.finished_in_window);
}

function chartOptions(title, series, el) {
  return {
    width: Math.max(300, el.clientWidth), height: 220,
    scales: { x: { time: true } },
    axes: [{}, { size: 60 }],
    legend: { live: false },
    series: [{ label: "time" }, ...series],
  };
}

function recentPoints(points) {
  // From the first bucket with any traffic (at least the last 2 minutes): an idle start
  // of the 10-minute window would squeeze the curves into the right edge.
  const busy = points.findIndex((p) => p.gen_tokens_per_s || p.prompt_tokens_per_s ||
                                       p.requests_per_s);
  const start = busy < 0 ? points.length - MIN_CHART_BUCKETS
                         : Math.min(busy, points.length - MIN_CHART_BUCKETS);
  return points.slice(Math.max(0, start));
}

function renderCharts(allPoints) {
  const points = recentPoints(allPoints);
  const t = points.map((p) => p.t);
  const data = {
    tokens: [t, points.map((p) => p.gen_tokens_per_s), points.map((p) => p.prompt_tokens_per_s)],
    ttft: [t, points.map((p) => p.ttft_p50_s), points.map((p) => p.ttft_p99_s)],
  };
  const specs = {
    tokens: [{ label: "generated", stroke: "#2f6fde", width: 2 },
             { label: "prompt", stroke: "#9aa5b8", width: 1 }],
    ttft: [{ label: "p50", stroke: "#1f9d55", width: 2, points: { show: true, size: 5 } },
           { label: "p99", stroke: "#c0392b", width: 1, points: { show: true, size: 5 } }],
  };
  for (const name of ["tokens", "ttft"]) {
    const el = $(`chart-${name}`);
    if (!charts[name]) {
      charts[name] = new uPlot(chartOptions(name, specs[name], el), data[name], el);
    } else {
      charts[name].setData(data[name]);
    }
  }
}

function showError(message) {
  const line = $("status-line");
  line.textContent = message;
  line.classList.add("error");
}

async function poll() {
  const headers = { Accept: "application/json" };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  let response;
  try {
    response = await fetch("/v1/fleet", { headers, cache: "no-store" });
  } catch (err) {
    showError(`gateway unreachable (${err.message}); retrying`);
    return;
  }
  if (response.status === 401) {
    $("auth").classList.add("shown");
    showError("this gateway requires an API key");
    return;
  }
  if (!response.ok) {
    showError(`GET /v1/fleet answered ${response.status}; retrying`);
    return;
  }
  const fleet = await response.json();
  $("auth").classList.remove("shown");
  renderStats(fleet);
  renderWorkers(fleet.workers);
  renderQueues(fleet.models);
  renderBatches(fleet.batches);
  renderJobs(fleet.recent_jobs);
  renderCharts(fleet.series.points);
  const line = $("status-line");
  line.classList.remove("error");
  line.textContent = `updated ${new Date(fleet.time * 1000).toLocaleTimeString()}` +
    ` · refreshes every ${POLL_MS / 1000} s`;
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function schedule() {
  clearTimeout(timer);
  poll().finally(() => { timer = setTimeout(schedule, POLL_MS); });
}

$("auth").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
  $("api-key").value = "";
  schedule();
});

window.addEventListener("resize", () => {
  for (const name of Object.keys(charts)) {
    const el = $(`chart-${name}`);
    charts[name].setSize({ width: Math.max(300, el.clientWidth), height: 220 });
  }
});

schedule();
