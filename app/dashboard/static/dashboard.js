// The ctpd dashboard: one script for every page (body[data-page] says which). It reads only the /v1 API,
// with the key the person signed in with, kept in this tab's sessionStorage and sent as a Bearer header; the
// key is never put in a URL, a cookie or the page. Everything the API returns is written with textContent,
// never as HTML, so a job's name or metadata cannot inject markup.
"use strict";

const KEY_STORAGE = "ctpd.apiKey";
const POLL_MS = 2000; // a running job's page: status, metrics and events this often
const LIST_POLL_MS = 5000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const CANCELLABLE = new Set(["queued", "running"]);
// The training charts: one per metric, one series per training stage (as the worker's MetricSink names them).
const TRAINING_METRICS = [
  ["loss", "Loss"],
  ["reward_accuracy", "Reward accuracy"],
  ["reward_margin", "Reward margin"],
  ["learning_rate", "Learning rate"],
];
const TRAINING_STAGES = [
  ["contrastive:positive", "π+", "#2a9d8f"],
  ["contrastive:negative", "π−", "#e76f51"],
  ["distill", "distill", "#264653"],
];
const COMPARE_COLOURS = ["#264653", "#e76f51", "#2a9d8f", "#e9c46a", "#8e44ad", "#3a86ff", "#6a994e", "#bc4749"];

// ------------------------------------------------------------------------------------------ DOM helpers

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "className") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const byId = (id) => document.getElementById(id);

function setError(id, message) {
  const node = byId(id);
  if (node) node.textContent = message || "";
}

function formatNumber(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e6)) return Number(value.toPrecision(4)).toExponential(); // 3e-4, 2.076e-4
  return value.toFixed(4).replace(/\.?0+$/, "");
}

function formatPercent(share) {
  return share === null || share === undefined || Number.isNaN(share) ? "—" : `${(100 * share).toFixed(1)} %`;
}

function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

function formatAge(iso) {
  if (!iso) return "—";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 86400) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

function formatTime(iso) {
  return iso ? new Date(iso).toLocaleString("en-GB", { hour12: false }) : "—";
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function statusBadge(status) {
  return el("span", { className: `status status-${status}`, dataset: { status } }, status);
}

function progressCell(job) {
  const { step, total, detail, eta_seconds: eta } = job.progress;
  if (step === null || step === undefined) {
    return el("span", { className: "muted" }, job.status === "succeeded" ? "done" : "—"); // export reports no steps
  }
  const share = total ? Math.min(1, step / total) : null;
  const label = `${step}${total ? ` / ${total}` : ""}${detail ? ` (${detail})` : ""}`;
  const bar = share === null ? null
    : el("span", { className: "bar" }, el("span", { className: "bar-fill", style: `width: ${(100 * share).toFixed(1)}%` }));
  const etaText = eta && !TERMINAL.has(job.status) ? ` · ${formatDuration(eta)} left` : "";
  return el("span", { className: "progress" }, bar, `${label}${etaText}`);
}

// A nested object as a definition table (dataset statistics, whatever shape they have).
// Objects whose keys are data, not field names: a dataset's token_lengths are keyed by model reference (a folder
// path or hub id such as "/models/my_student"), shown as written, never with "_" read as a space.
const VERBATIM_KEYS = new Set(["token_lengths"]);

function valueTable(value, verbatim = false) {
  if (value === null || value === undefined) return el("span", { className: "muted" }, "—");
  if (Array.isArray(value)) {
    if (value.every((item) => item === null || typeof item !== "object")) return el("span", {}, value.map(formatNumber).join(", "));
    return el("div", {}, value.map((item) => valueTable(item)));
  }
  if (typeof value === "object") {
    const entries = Object.entries(value).filter(([key]) => key !== "object"); // the API's type tag says nothing here
    if (!entries.length) return el("span", { className: "muted" }, "none");
    const rows = entries.map(([key, item]) => el("tr", {},
      el("th", {}, verbatim ? key : key.replaceAll("_", " ")), el("td", {}, valueTable(item, VERBATIM_KEYS.has(key)))));
    return el("table", { className: "kv" }, el("tbody", {}, rows));
  }
  return el("span", {}, formatNumber(value));
}

// ------------------------------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${apiKey()}` };
  const response = await fetch(path, { ...options, headers, cache: "no-store", credentials: "omit" });
  if (response.status === 401) {
    signOut("The API refused this key (unknown or revoked); sign in with another one.");
    throw new ApiError(401, "signed out");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON: the status line says enough */ }
    throw new ApiError(response.status, message);
  }
  return response;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

// A download needs the Bearer header, which a plain link cannot send: fetch it, then save it from a blob URL.
async function download(path, filename) {
  const blob = await (await api(path)).blob();
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// ------------------------------------------------------------------------------------------ signing in

const timers = [];

// ``task`` every ``ms``, never two at once: a slow answer must not let a second read of the same events overlap.
function every(ms, task) {
  let busy = false;
  const run = async () => {
    if (busy) return;
    busy = true;
    try { await task(); } catch (error) { if (!(error instanceof ApiError && error.status === 401)) console.error(error); }
    finally { busy = false; }
  };
  timers.push(setInterval(run, ms));
}

function stopTimers() {
  while (timers.length) clearInterval(timers.pop());
}

function showSignIn(message) {
  byId("main").hidden = true;
  byId("sign-out").hidden = true;
  byId("who").textContent = "";
  byId("sign-in").hidden = false;
  setError("sign-in-error", message);
  byId("api-key").focus();
}

function signOut(message) {
  stopTimers();
  sessionStorage.removeItem(KEY_STORAGE);
  for (const node of document.querySelectorAll("[data-clear-on-sign-out]")) node.replaceChildren();
  showSignIn(message || "");
}

async function signedIn() {
  byId("sign-in").hidden = true;
  byId("main").hidden = false;
  byId("sign-out").hidden = false;
  byId("who").textContent = "signed in";
  await PAGES[document.body.dataset.page]();
}

async function trySignIn(event) {
  event.preventDefault(); // never submitted: the key must not leave in a request body or a URL
  const input = byId("api-key");
  const typedKey = input.value.trim();
  if (!typedKey) return;
  const response = await fetch("/v1/jobs?limit=1", { headers: { Authorization: `Bearer ${typedKey}` }, cache: "no-store", credentials: "omit" });
  if (response.status === 401) {
    setError("sign-in-error", "This key was refused: it is unknown or revoked. Create one with `ctpd keys create --tenant NAME`.");
    return;
  }
  if (!response.ok) {
    setError("sign-in-error", `The API answered ${response.status}; try again in a moment.`);
    return;
  }
  input.value = "";
  sessionStorage.setItem(KEY_STORAGE, typedKey);
  setError("sign-in-error", "");
  await signedIn();
}

// ------------------------------------------------------------------------------------------ charts

// The width of the grid cell the chart sits in (the style sheet lays charts out two to a row).
function chartWidth(box) {
  return Math.max(260, (box.clientWidth || 480) - 4);
}

// A line chart of ``series`` ([{label, colour}]) against step; ``chart.update(data)`` redraws it in place.
function lineChart(container, title, series, { logY = false } = {}) {
  const box = el("div", { className: "chart", dataset: { metric: title, points: "0" } });
  container.append(box);
  const options = {
    title,
    width: chartWidth(box),
    height: 220,
    scales: { x: { time: false }, y: logY ? { distr: 3 } : {} },
    axes: [{ label: "step" }, { size: 64, values: (_, ticks) => ticks.map((tick) => formatNumber(Number(tick.toPrecision(3)))) }],
    series: [{ label: "step" }, ...series.map(({ label, colour }) => ({
      label, stroke: colour, width: 2, spanGaps: true, points: { show: false },
      value: (_, v) => (v === null || v === undefined ? "—" : formatNumber(v)),
    }))],
    legend: { live: true },
  };
  const plot = new uPlot(options, [[], ...series.map(() => [])], box);
  return {
    box,
    update(data) {
      plot.setData(data);
      const points = data.slice(1).reduce((sum, ys) => sum + ys.filter((y) => y !== null && y !== undefined).length, 0);
      box.dataset.points = String(points);
    },
  };
}

// Several {step: value} series on one step axis: uPlot's aligned form [[steps], [values or null], ...].
function aligned(seriesList) {
  const steps = [...new Set(seriesList.flatMap((points) => points.map((p) => p.step)))].sort((a, b) => a - b);
  const index = new Map(steps.map((step, i) => [step, i]));
  const columns = seriesList.map((points) => {
    const column = new Array(steps.length).fill(null);
    for (const point of points) column[index.get(point.step)] = point.value;
    return column;
  });
  return [steps, ...columns];
}

// ------------------------------------------------------------------------------------------ the job list

function parseMetadataFilter(text) {
  const filters = [];
  for (const part of text.split(/[\s,]+/).filter(Boolean)) {
    const at = part.indexOf("=");
    if (at <= 0) throw new Error(`metadata filter "${part}": write key=value (e.g. team=nlp)`);
    filters.push([part.slice(0, at), part.slice(at + 1)]);
  }
  return filters;
}

function jobsQuery({ status, metadata, after, limit = 50 }) {
  const query = new URLSearchParams({ limit: String(limit) });
  if (status) query.set("status", status);
  for (const [key, value] of metadata || []) query.append(`metadata[${key}]`, value);
  if (after) query.set("after", after);
  return `/v1/jobs?${query}`;
}

async function jobsPage() {
  const selected = new Set();
  let filters = { status: "", metadata: [] };
  let shown = 50;
  const compareButton = byId("compare-selected");
  compareButton.onclick = () => { location.href = `/compare?jobs=${[...selected].join(",")}`; };

  const row = (job) => {
    const box = el("input", { type: "checkbox", "aria-label": `select ${job.id}`, checked: selected.has(job.id) });
    box.onchange = () => {
      if (box.checked) selected.add(job.id); else selected.delete(job.id);
      compareButton.disabled = selected.size < 2;
    };
    const metadata = Object.entries(job.metadata).flatMap(([key, value]) => [el("span", { className: "tag" }, `${key}=${value}`), " "]);
    return el("tr", { dataset: { jobId: job.id } },
      el("td", {}, box),
      el("td", {}, el("a", { href: `/jobs/${encodeURIComponent(job.id)}` }, job.name || job.id),
        job.name ? el("div", { className: "muted small" }, job.id) : null),
      el("td", {}, statusBadge(job.status)),
      el("td", {}, job.stage || "—"),
      el("td", {}, progressCell(job)),
      el("td", { title: formatTime(job.created_at) }, formatAge(job.created_at)),
      el("td", {}, job.spec.method),
      el("td", {}, metadata));
  };

  const refresh = async () => {
    const jobs = [];
    let after = null, hasMore = true;
    while (hasMore && jobs.length < shown) { // pages of at most 100 (the API's limit) up to what is shown
      const page = await apiJson(jobsQuery({ ...filters, after, limit: Math.min(100, shown - jobs.length) }));
      jobs.push(...page.data);
      hasMore = page.has_more;
      after = jobs.length ? jobs[jobs.length - 1].id : null;
    }
    byId("jobs-body").replaceChildren(...jobs.map(row));
    byId("jobs-empty").hidden = jobs.length > 0;
    byId("jobs-more").hidden = !hasMore;
    setError("jobs-error", "");
  };

  byId("job-filters").onsubmit = async (event) => {
    event.preventDefault();
    try {
      filters = { status: byId("filter-status").value, metadata: parseMetadataFilter(byId("filter-metadata").value) };
      await refresh();
    } catch (error) {
      setError("jobs-error", error.message);
    }
  };
  byId("jobs-more").onclick = async () => { shown += 50; await refresh(); };
  byId("jobs-body").dataset.clearOnSignOut = "";
  await refresh();
  every(LIST_POLL_MS, refresh);
}

// ------------------------------------------------------------------------------------------ a job's page

function jobIdFromPath() {
  return decodeURIComponent(location.pathname.replace(/^\/jobs\//, "").replace(/\/$/, ""));
}

function fact(label, value) {
  return el("div", { className: "fact" }, el("span", { className: "label" }, label), el("span", { className: "value" }, value));
}

function renderJobHead(job) {
  document.title = `${job.name || job.id} · ctpd`;
  byId("job-title").replaceChildren(job.name || job.id, " ", statusBadge(job.status));
  const spec = job.spec;
  const dataset = spec.dataset && spec.dataset.id
    ? el("a", { href: `/datasets/${encodeURIComponent(spec.dataset.id)}` }, spec.dataset.id) : (spec.dataset && spec.dataset.path) || "—";
  byId("job-facts").replaceChildren(...[
    fact("id", job.id),
    fact("status", job.status),
    fact("stage", job.stage || "—"),
    fact("progress", progressCell(job)),
    fact("method", spec.method),
    fact("student", modelName(spec.student)),
    fact("teacher", modelName(spec.teacher)),
    fact("dataset", dataset),
    fact("attempt", `${job.attempt} of ${job.max_attempts}`),
    fact("created", `${formatTime(job.created_at)} (${formatAge(job.created_at)} ago)`),
    fact("finished", formatTime(job.finished_at)),
    job.queue ? fact("queue", `#${job.queue.position}: ${job.queue.detail}`) : null,
    Object.keys(job.metadata).length ? fact("metadata", Object.entries(job.metadata).map(([k, v]) => `${k}=${v}`).join(" ")) : null,
  ].filter(Boolean));
  setError("job-error", job.error ? `${job.error.code}: ${job.error.message}` : "");
  const cancel = byId("cancel-job");
  cancel.hidden = !(CANCELLABLE.has(job.status) || job.status === "cancelling");
  cancel.disabled = job.status === "cancelling";
  cancel.textContent = job.status === "cancelling" ? "Cancelling…" : "Cancel job";
}

function modelName(reference) {
  if (!reference) return "—";
  return reference.model || reference.path || reference.hub || JSON.stringify(reference);
}

function renderPrepareStats(summary) {
  const target = byId("prepare-stats");
  const alignment = summary.alignment || {};
  const responses = alignment.examples;
  const truncated = summary.truncated_responses;
  const dropped = summary.dropped || {};
  const rows = [
    ["training pairs", formatNumber(summary.train_pairs)],
    ["validation pairs", formatNumber(summary.validation_pairs)],
    ["dropped pairs", Object.entries(dropped).map(([why, n]) => `${n} ${why.replace("_", " ")}`).join(", ") || "0"],
    ["spans", formatNumber(alignment.spans)],
    ["1:1 spans", formatPercent(alignment["share_1:1"])],
    ["1:n / n:1 / n:m", ["1:n", "n:1", "n:m"].map((t) => formatPercent(alignment[`share_${t}`])).join(" / ")],
    ["tokens per span (student / teacher)", `${formatNumber(alignment.student_tokens_per_span)} / ${formatNumber(alignment.teacher_tokens_per_span)}`],
    ["mean span length", alignment.mean_span_bytes === undefined ? "—" : `${formatNumber(alignment.mean_span_bytes)} bytes`],
    ["truncated responses", truncated === undefined ? "—"
      : `${truncated} of ${responses ?? "?"} (${formatPercent(responses ? truncated / responses : null)})`],
  ];
  const table = el("table", { className: "kv", id: "prepare-table" },
    el("tbody", {}, rows.map(([label, value]) => el("tr", {}, el("th", {}, label), el("td", {}, value)))));
  const histogram = summary.span_length_histogram;
  let figure;
  if (histogram && histogram.bins && histogram.spans) {
    const most = Math.max(1, ...histogram.spans);
    const total = histogram.spans.reduce((a, b) => a + b, 0) || 1;
    figure = el("figure", { className: "histogram", id: "span-histogram" },
      el("figcaption", {}, "Span length (bytes): share of spans"),
      histogram.bins.map((bin, i) => el("div", { className: "hist-row" },
        el("span", { className: "hist-label" }, bin),
        el("span", { className: "hist-bar" }, el("span", { className: "hist-fill", style: `width: ${(100 * histogram.spans[i] / most).toFixed(1)}%` })),
        el("span", { className: "hist-value" }, `${formatPercent(histogram.spans[i] / total)} (${histogram.spans[i]})`))));
  } else {
    figure = el("p", { className: "muted" }, "No span length histogram: this job's prepare output was computed before it was recorded.");
  }
  target.replaceChildren(table, figure);
}

// evaluate/<name> beside evaluate/initial_<name>: the distilled student against the one it started from.
function evaluationRows(metrics) {
  const values = {};
  for (const [key, points] of Object.entries(metrics)) {
    if (key.startsWith("evaluate/") && points.length) values[key.slice("evaluate/".length)] = points[points.length - 1].value;
  }
  const rows = [];
  for (const [name, value] of Object.entries(values)) {
    if (name.startsWith("initial_")) continue;
    const initial = values[`initial_${name}`];
    rows.push({ name, initial, value });
  }
  rows.sort((a, b) => (a.initial === undefined) - (b.initial === undefined) || a.name.localeCompare(b.name));
  return rows;
}

function renderEvaluation(metrics) {
  const rows = evaluationRows(metrics);
  if (!rows.length) return;
  const change = (row) => (row.initial === undefined ? "" : `${row.value - row.initial >= 0 ? "+" : ""}${formatNumber(row.value - row.initial)}`);
  byId("evaluation").replaceChildren(el("table", { className: "list metrics", id: "evaluation-table" },
    el("thead", {}, el("tr", {}, el("th", {}, "held-out metric"), el("th", {}, "initial student"), el("th", {}, "distilled"), el("th", {}, "change"))),
    el("tbody", {}, rows.map((row) => el("tr", {},
      el("td", {}, row.name.replaceAll("_", " ")),
      el("td", {}, row.initial === undefined ? "—" : formatNumber(row.initial)),
      el("td", {}, formatNumber(row.value)),
      el("td", {}, change(row)))))));
}

async function renderArtifacts(job) {
  if (job.status !== "succeeded") return;
  const listing = await apiJson(`/v1/jobs/${encodeURIComponent(job.id)}/artifacts`);
  const button = (label, path, filename) => el("button", {
    type: "button", className: "link", dataset: { download: path },
    onclick: async (event) => {
      event.target.disabled = true;
      try { await download(path, filename); } catch (error) { setError("job-error", `download failed: ${error.message}`); }
      event.target.disabled = false;
    },
  }, label);
  const rows = listing.data.map((file) => el("tr", {},
    el("td", {}, button(file.path, file.download_url, file.path.split("/").pop())),
    el("td", {}, formatBytes(file.size_bytes))));
  const whole = job.model ? el("p", {}, button("the whole folder (model.tar.gz)", job.model.download_url, `${job.id}-model.tar.gz`),
    el("span", { className: "muted" }, ` · use it as a model: `), el("code", {}, job.model.id)) : null;
  byId("artifacts").replaceChildren(el("div", {}, whole,
    rows.length ? el("table", { className: "list", id: "artifacts-table" }, el("tbody", {}, rows)) : el("p", { className: "muted" }, "No files.")));
}

async function jobPage() {
  const jobId = jobIdFromPath();
  const base = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const chartsBox = byId("training-charts");
  chartsBox.replaceChildren();
  const charts = TRAINING_METRICS.map(([metric, title]) => ({
    metric,
    chart: lineChart(chartsBox, title, TRAINING_STAGES.map(([, label, colour]) => ({ label, colour }))),
  }));
  let lastEvent = null, finished = false, prepareShown = false, artifactsShown = false;

  const refreshMetrics = async () => {
    const metrics = (await apiJson(`${base}/metrics`)).data;
    for (const { metric, chart } of charts) {
      chart.update(aligned(TRAINING_STAGES.map(([stage]) => metrics[`${stage}/${metric}`] || [])));
    }
    renderEvaluation(metrics);
  };

  const refreshEvents = async () => {
    let hasMore = true;
    while (hasMore) {
      const page = await apiJson(`${base}/events?limit=1000${lastEvent === null ? "" : `&after=${lastEvent}`}`);
      for (const event of page.data) {
        lastEvent = event.id;
        byId("events-body").prepend(el("tr", { className: `level-${event.level}`, dataset: { type: event.type } },
          el("td", { className: "nowrap" }, formatTime(event.created_at)),
          el("td", {}, event.level),
          el("td", {}, event.stage || ""),
          el("td", {}, event.type),
          el("td", {}, event.message)));
        if (event.type === "stage_finished" && event.stage === "prepare" && event.data && event.data.summary) {
          renderPrepareStats(event.data.summary);
          prepareShown = true;
        }
      }
      hasMore = page.has_more;
    }
  };

  // The metric series are read again only when the job moved on: a long job's series are large, and its
  // progress (written with its metrics, at most every few seconds) says when there is something new.
  let seen = null;
  const refresh = async () => {
    if (finished) return;
    const job = await apiJson(base);
    renderJobHead(job);
    const moved = `${job.status} ${job.stage} ${job.progress.detail} ${job.progress.step} ${job.attempt}`;
    await Promise.all([moved !== seen || TERMINAL.has(job.status) ? refreshMetrics() : null, refreshEvents()]);
    seen = moved;
    if (TERMINAL.has(job.status)) {
      finished = true; // one last read above saw everything the job wrote
      if (!artifactsShown) { artifactsShown = true; await renderArtifacts(job); }
      if (!prepareShown && job.status !== "succeeded") byId("prepare-stats").replaceChildren(el("p", { className: "muted" }, "The job ended before its prepare stage finished."));
    }
  };

  byId("cancel-job").onclick = async () => {
    if (!window.confirm(`Cancel job ${jobId}? A running job checkpoints and stops.`)) return;
    try {
      renderJobHead(await apiJson(`${base}/cancel`, { method: "POST" }));
    } catch (error) {
      setError("job-error", `cancel failed: ${error.message}`);
    }
  };
  try {
    await refresh();
  } catch (error) {
    if (error.status === 404) { setError("job-error", `No job ${jobId} for this key.`); return; }
    throw error;
  }
  every(POLL_MS, refresh);
}

// ------------------------------------------------------------------------------------------ compare

function compareIds() {
  const value = new URLSearchParams(location.search).get("jobs") || "";
  return [...new Set(value.split(",").map((id) => id.trim()).filter(Boolean))];
}

async function comparePicker() {
  const picker = byId("compare-picker");
  picker.hidden = false;
  const finished = (await apiJson(jobsQuery({ status: "succeeded", limit: 50 }))).data;
  const chosen = new Set();
  const button = byId("compare-picked");
  byId("picker-body").replaceChildren(...finished.map((job) => {
    const box = el("input", { type: "checkbox", "aria-label": `compare ${job.id}` });
    box.onchange = () => { if (box.checked) chosen.add(job.id); else chosen.delete(job.id); button.disabled = chosen.size < 2; };
    return el("tr", {}, el("td", {}, box), el("td", {}, job.name || job.id), el("td", {}, job.spec.method),
      el("td", {}, formatAge(job.finished_at)));
  }));
  if (!finished.length) byId("picker-body").append(el("tr", {}, el("td", {}, "No succeeded jobs yet.")));
  button.onclick = () => { location.href = `/compare?jobs=${[...chosen].join(",")}`; };
}

function specRows(jobs, metrics) {
  // An epochs-driven job has no max_steps in its spec: the steps it ran are its distill curve's last step.
  const distillSteps = (job, series) => {
    if (job.spec.training.max_steps != null) return job.spec.training.max_steps;
    const losses = (series && series["distill/loss"]) || [];
    return losses.length ? losses[losses.length - 1].step : null;
  };
  const duration = (job) => (job.started_at && job.finished_at ? (Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000 : null);
  return [
    ["status", jobs.map((j) => statusBadge(j.status))],
    ["method", jobs.map((j) => j.spec.method)],
    ["student", jobs.map((j) => modelName(j.spec.student))],
    ["teacher", jobs.map((j) => modelName(j.spec.teacher))],
    ["distill steps", jobs.map((j, i) => formatNumber(distillSteps(j, metrics[i])))],
    ["learning rate", jobs.map((j) => formatNumber(j.spec.training.learning_rate))],
    ["beta", jobs.map((j) => formatNumber(j.spec.beta))],
    ["wall time", jobs.map((j) => formatDuration(duration(j)))],
  ];
}

async function comparePage() {
  const ids = compareIds();
  if (ids.length < 2) { await comparePicker(); return; }
  const jobs = [];
  for (const id of ids) {
    try {
      jobs.push(await apiJson(`/v1/jobs/${encodeURIComponent(id)}`));
    } catch (error) {
      setError("compare-error", error.status === 404 ? `No job ${id} for this key.` : error.message);
      return;
    }
  }
  const metrics = await Promise.all(jobs.map((job) => apiJson(`/v1/jobs/${encodeURIComponent(job.id)}/metrics`).then((m) => m.data)));
  const unfinished = jobs.filter((job) => !TERMINAL.has(job.status));
  if (unfinished.length) setError("compare-error", `Not finished yet: ${unfinished.map((j) => j.id).join(", ")} (their curves are partial).`);
  byId("compare-results").hidden = false;

  const label = (job) => job.name || job.id;
  const evaluation = jobs.map((_, i) => new Map(evaluationRows(metrics[i]).map((row) => [row.name, row])));
  const names = [...new Set(evaluation.flatMap((rows) => [...rows.keys()]))];
  const rows = [
    ...specRows(jobs, metrics),
    ...names.map((name) => [`${name.replaceAll("_", " ")}${evaluation.some((rows) => rows.get(name) && rows.get(name).initial !== undefined) ? " (initial → distilled)" : ""}`, evaluation.map((rows) => {
      const row = rows.get(name);
      if (!row) return "—";
      return row.initial === undefined ? formatNumber(row.value) : `${formatNumber(row.initial)} → ${formatNumber(row.value)}`;
    })]),
  ];
  byId("compare-table").replaceChildren(
    el("thead", {}, el("tr", {}, el("th", {}, ""), jobs.map((job, i) => el("th", {},
      el("span", { className: "swatch", style: `background: ${COMPARE_COLOURS[i % COMPARE_COLOURS.length]}` }),
      el("a", { href: `/jobs/${encodeURIComponent(job.id)}` }, label(job)))))),
    el("tbody", {}, rows.map(([name, cells]) => el("tr", {}, el("th", {}, name), cells.map((cell) => el("td", {}, cell))))));

  const box = byId("compare-charts");
  box.replaceChildren();
  for (const [metric, title] of TRAINING_METRICS) {
    const chart = lineChart(box, title, jobs.map((job, i) => ({ label: label(job), colour: COMPARE_COLOURS[i % COMPARE_COLOURS.length] })));
    chart.update(aligned(metrics.map((m) => m[`distill/${metric}`] || [])));
  }
}

// ------------------------------------------------------------------------------------------ datasets

async function datasetsPage() {
  let shown = 50;
  const refresh = async () => {
    const datasets = [];
    let after = null, hasMore = true;
    while (hasMore && datasets.length < shown) {
      const query = new URLSearchParams({ limit: String(Math.min(100, shown - datasets.length)) });
      if (after) query.set("after", after);
      const page = await apiJson(`/v1/datasets?${query}`);
      datasets.push(...page.data);
      hasMore = page.has_more;
      after = datasets.length ? datasets[datasets.length - 1].id : null;
    }
    byId("datasets-body").replaceChildren(...datasets.map((d) => el("tr", { dataset: { datasetId: d.id } },
      el("td", {}, el("a", { href: `/datasets/${encodeURIComponent(d.id)}` }, d.id)),
      el("td", {}, d.filename), el("td", {}, d.format), el("td", {}, formatNumber(d.num_rows)),
      el("td", {}, formatBytes(d.size_bytes)), el("td", { title: formatTime(d.created_at) }, formatAge(d.created_at)))));
    byId("datasets-empty").hidden = datasets.length > 0;
    byId("datasets-more").hidden = !hasMore;
  };
  byId("datasets-more").onclick = async () => { shown += 50; await refresh(); };
  await refresh();

  const id = decodeURIComponent(location.pathname.replace(/^\/datasets\/?/, ""));
  if (!id) return;
  let dataset;
  try {
    dataset = await apiJson(`/v1/datasets/${encodeURIComponent(id)}`);
  } catch (error) {
    setError("datasets-error", error.status === 404 ? `No dataset ${id} for this key.` : error.message);
    return;
  }
  byId("dataset-detail").hidden = false;
  byId("dataset-title").textContent = dataset.filename;
  byId("dataset-facts").replaceChildren(valueTable({
    id: dataset.id, format: dataset.format, rows: dataset.num_rows, size: formatBytes(dataset.size_bytes),
    sha256: dataset.sha256, uploaded: formatTime(dataset.created_at),
  }));
  byId("dataset-stats").replaceChildren(datasetStats(dataset.stats));
}

// A Dataset object's stats: the upload's counts (or why there are none: stored before they were counted), then the
// token lengths preflights measured per tokenizer. The id is in the facts above; counted/missing are said, not listed.
function datasetStats(stats) {
  if (!stats) return el("p", { className: "muted", id: "no-dataset-stats" }, "No statistics recorded for this dataset.");
  const { dataset_id: _id, counted, missing, token_lengths: tokenLengths, ...counts } = stats;
  const measured = Object.keys(tokenLengths || {}).length > 0;
  return el("div", {},
    counted ? valueTable(counts)
      : el("p", { className: "muted", id: "no-dataset-stats" }, `Not counted: ${missing || "no counts were stored for this dataset"}.`),
    el("h4", {}, "Token lengths, per tokenizer (measured by preflights)"),
    measured ? el("div", { id: "dataset-token-lengths" }, valueTable(tokenLengths, true))
      : el("p", { className: "muted", id: "no-token-lengths" },
        "None measured yet: a dry run of a job on this dataset (ctpd submit SPEC --dry-run) measures them."));
}

// ------------------------------------------------------------------------------------------ start

const PAGES = { jobs: jobsPage, job: jobPage, compare: comparePage, datasets: datasetsPage };

document.addEventListener("DOMContentLoaded", () => {
  byId("sign-in-form").addEventListener("submit", (event) => {
    trySignIn(event).catch((error) => setError("sign-in-error", `Could not reach the API: ${error.message}`));
  });
  byId("sign-out").addEventListener("click", () => signOut("Signed out."));
  if (apiKey()) signedIn().catch((error) => console.error(error));
  else showSignIn("");
});
