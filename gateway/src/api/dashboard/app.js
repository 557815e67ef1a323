// The gateway dashboard: fleet overview, device table, device pages with live charts, a
// command form and revocation. Reads the API with the token kept in this browser, and the
// live WebSocket feed for what is committed as it happens; reconnects by itself.

import { LineChart } from "./chart.js";

const $ = (sel) => document.querySelector(sel);
const ROW_HEIGHT = 30;
const RANGES = { 900000: "15 min", 3600000: "1 h", 86400000: "24 h", 604800000: "7 d" };

const state = {
  token: localStorage.getItem("gatewayToken") || "",
  devices: new Map(),       // id -> device record from the API
  readingsSeen: new Map(),  // id -> [[t, readings_total], ...] over the last ~70 s
  samples: [],              // stats history, oldest first
  errorSnapshots: [],       // [[t, link errors total], ...]
  sort: { key: "id", dir: 1 },
  filter: "",
  rows: [],                 // the filtered, sorted device list the table shows
  ws: null,
  wsBackoff: 500,
  online: false,
  route: { page: "overview" },
  range: 900000,
  started: false,
};

// What the page shows, for tests and curious operators (read-only use).
const dashboard = (window.dashboard = { charts: {}, history: {}, historyUrl: null, anomalies: [], rows: () => state.rows.map((d) => d.id) });

function setConn(live, text) {
  state.online = live;
  const el = $("#conn");
  el.textContent = text;
  el.className = "conn " + (live ? "live" : "offline");
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (options.body) headers["content-type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) throw new Unauthorized("the token was refused");
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body?.error?.message || response.statusText);
  return body;
}

function ago(ms) {
  if (ms == null) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function fmt(n) {
  return n >= 10000 ? Math.round(n).toLocaleString("en") : (+n.toFixed(1)).toLocaleString("en");
}

function stateOf(d) {
  return d.revoked ? "revoked" : d.online ? "online" : "offline";
}

// ---- login ----------------------------------------------------------------------------

function showLogin(message) {
  for (const id of ["#overview", "#device"]) $(id).hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  setConn(false, "not signed in");
  $("#token").focus();
}

$("#login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  state.token = $("#token").value.trim();
  try {
    await api("/api/v1/stats");
    localStorage.setItem("gatewayToken", state.token);
    $("#login").hidden = true;
    start();
  } catch (err) {
    showLogin(err instanceof Unauthorized ? "That token was refused." : `Cannot reach the gateway: ${err.message}`);
  }
});

// ---- overview -------------------------------------------------------------------------

const rateChart = new LineChart($("#rate-chart"));
rateChart.zero = true;

async function pollStats() {
  const first = state.samples.length === 0;
  const stats = await api(`/api/v1/stats?history=${first ? 600 : 5}`);
  const last = state.samples.length ? state.samples[state.samples.length - 1].ts_ms : 0;
  // A restarted gateway starts its counters again: begin a new history.
  const fresh = stats.history.filter((s) => s.ts_ms > last);
  if (fresh.length && state.samples.length && fresh[0].readings < state.samples[state.samples.length - 1].readings) {
    state.samples = [];
  }
  state.samples.push(...fresh);
  if (state.samples.length > 600) state.samples.splice(0, state.samples.length - 600);
  const now = Date.now();
  const errorsTotal = Object.values(stats.link_errors).reduce((a, b) => a + b, 0);
  state.errorSnapshots.push([now, errorsTotal]);
  while (state.errorSnapshots.length && state.errorSnapshots[0][0] < now - 60000) state.errorSnapshots.shift();
  const errorsMinute = Math.max(0, errorsTotal - state.errorSnapshots[0][1]);

  $("#rate").textContent = fmt(stats.rates.last_10s.readings_per_s);
  $("#frame-rate").textContent = fmt(stats.rates.last_10s.frames_per_s);
  const m = stats.mqtt;
  $("#mqtt").textContent = !m.enabled ? "off" : `${m.connected ? "connected" : "disconnected"}, ${fmt(m.backlog_rows)} queued`;
  $("#queue").textContent = stats.store_full
    ? "STORE FULL: devices held back"
    : `${Math.round(stats.store_queue_fill * 100)} %`;
  $("#queue").classList.toggle("alarm", Boolean(stats.store_full));
  const pacing = stats.pacing;
  $("#pacing").textContent = pacing.state === "slowing"
    ? `slowing ${pacing.devices_paced} device(s) to 1 frame / ${pacing.report_interval_ms} ms`
    : pacing.state;
  $("#errors").textContent = String(errorsMinute);
  $("#anomalies").textContent = stats.anomalies_total != null ? String(stats.anomalies_total) : "n/a";

  const readings = [], frames = [];
  for (let i = 1; i < state.samples.length; i++) {
    const a = state.samples[i - 1], b = state.samples[i];
    const dt = (b.ts_ms - a.ts_ms) / 1000;
    if (dt <= 0 || b.readings < a.readings) continue;
    readings.push([b.ts_ms, (b.readings - a.readings) / dt]);
    frames.push([b.ts_ms, (b.frames - a.frames) / dt]);
  }
  dashboard.rates = readings;
  rateChart.set([{ points: readings }, { points: frames, dashed: true }], [now - 600000, now]);
}

async function pollDevices() {
  const all = [];
  let after = "";
  for (;;) {
    const page = await api(`/api/v1/devices?limit=1000&after=${encodeURIComponent(after)}`);
    all.push(...page.devices);
    if (!page.next) break;
    after = page.next;
  }
  const now = Date.now();
  state.devices = new Map(all.map((d) => [d.id, d]));
  for (const d of all) {
    const seen = state.readingsSeen.get(d.id) || [];
    seen.push([now, d.readings_total]);
    while (seen.length > 1 && seen[0][0] < now - 61000) seen.shift();
    state.readingsSeen.set(d.id, seen);
  }
  let online = 0, offline = 0, revoked = 0;
  for (const d of all) {
    if (d.revoked) revoked++;
    else if (d.online) online++;
    else offline++;
  }
  $("#online").textContent = String(online);
  $("#offline").textContent = String(offline);
  $("#revoked").textContent = String(revoked);
  refreshRows();
}

// Readings the device had stored over the last minute, from the device list polled every 3 s;
// while the page has watched for less than a minute, what it saw scaled to a minute. `null`
// until two polls have been seen (unknown, not zero).
function readingsLastMinute(id) {
  const seen = state.readingsSeen.get(id);
  if (!seen || seen.length < 2) return null;
  const [t0, n0] = seen[0];
  const [t1, n1] = seen[seen.length - 1];
  const span = t1 - t0;
  if (span <= 0) return null;
  // A count of readings: whole numbers (an estimate until a minute has been seen).
  return span >= 60000 ? n1 - n0 : Math.round(((n1 - n0) * 60000) / span);
}

function sortValue(d, key) {
  switch (key) {
    case "state": return stateOf(d);
    case "link": return d.link || "";
    case "firmware": return d.firmware_version || "";
    case "seen": return -(d.last_seen_ms || 0);
    case "rate": return -(readingsLastMinute(d.id) ?? -1);
    default: return d.id;
  }
}

function refreshRows() {
  const filter = state.filter.toLowerCase();
  const { key, dir } = state.sort;
  state.rows = [...state.devices.values()]
    .filter((d) => !filter || d.id.toLowerCase().includes(filter))
    .sort((a, b) => {
      const x = sortValue(a, key), y = sortValue(b, key);
      return (x < y ? -1 : x > y ? 1 : a.id < b.id ? -1 : 1) * dir;
    });
  $("#shown").textContent = `${state.rows.length} of ${state.devices.size} devices`;
  renderTable();
}

// Only the rows in view exist in the DOM; they are reused and updated in place.
const tbody = $("#devices tbody");
const scroller = $("#table-scroll");
const pool = [];
let tableFrame = 0;

function cell(tr, i) {
  return tr.children[i];
}

function makeRow() {
  const tr = document.createElement("tr");
  tr.innerHTML = '<td><a></a></td><td></td><td></td><td></td><td></td><td class="num"></td>';
  return tr;
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

function renderTable() {
  if (tableFrame) return;
  tableFrame = requestAnimationFrame(() => {
    tableFrame = 0;
    const total = state.rows.length;
    const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_HEIGHT) - 5);
    const count = Math.min(total - first, Math.ceil(scroller.clientHeight / ROW_HEIGHT) + 10);
    while (pool.length < count) pool.push(makeRow());
    const top = document.createElement("tr");
    top.style.height = `${first * ROW_HEIGHT}px`;
    const bottom = document.createElement("tr");
    bottom.style.height = `${Math.max(0, total - first - count) * ROW_HEIGHT}px`;
    const rows = [top];
    for (let i = 0; i < count; i++) {
      const d = state.rows[first + i];
      const tr = pool[i];
      const a = cell(tr, 0).firstChild;
      setText(a, d.id);
      const href = `#/device/${encodeURIComponent(d.id)}`;
      if (a.getAttribute("href") !== href) a.setAttribute("href", href);
      const s = stateOf(d);
      setText(cell(tr, 1), s);
      cell(tr, 1).className = `state-${s}`;
      setText(cell(tr, 2), d.link || "–");
      setText(cell(tr, 3), d.firmware_version || "–");
      setText(cell(tr, 4), d.online ? ago(d.last_seen_ms) : ago(d.last_seen_ms));
      const perMinute = readingsLastMinute(d.id);
      setText(cell(tr, 5), perMinute == null ? "–" : fmt(perMinute));
      rows.push(tr);
    }
    rows.push(bottom);
    tbody.replaceChildren(...rows);
  });
}

scroller.addEventListener("scroll", renderTable, { passive: true });
$("#filter").addEventListener("input", (e) => {
  state.filter = e.target.value;
  refreshRows();
});
for (const button of document.querySelectorAll("#devices th button")) {
  button.addEventListener("click", () => {
    const key = button.dataset.sort;
    state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
    for (const th of document.querySelectorAll("#devices th")) th.removeAttribute("aria-sort");
    button.parentElement.setAttribute("aria-sort", state.sort.dir > 0 ? "ascending" : "descending");
    refreshRows();
  });
}

// ---- device page ----------------------------------------------------------------------

const charts = new Map(); // sensor -> LineChart

function chartFor(sensor) {
  if (!charts.has(sensor)) {
    const figure = document.createElement("figure");
    const title = document.createElement("h4");
    title.textContent = sensor;
    const canvas = document.createElement("canvas");
    canvas.width = 420;
    canvas.height = 160;
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `${sensor} over the selected range`);
    canvas.dataset.sensor = sensor;
    figure.append(title, canvas);
    $("#charts").append(figure);
    charts.set(sensor, new LineChart(canvas));
    dashboard.charts[sensor] = [];
  }
  return charts.get(sensor);
}

function redrawCharts() {
  const now = Date.now();
  for (const [sensor, chart] of charts) {
    const points = dashboard.charts[sensor];
    while (points.length && points[0][0] < now - state.range) points.shift();
    // A sensor's own anomalies, and the device-level ones (dropout, traffic) on every chart.
    chart.markers = dashboard.anomalies
      .filter((a) => a.sensor === sensor || a.sensor === null)
      .map((a) => ({ from: a.ts_ms, to: a.to_ms, label: a.kind }));
    chart.set([{ points }], [now - state.range, now]);
  }
}

// Anomalies of the device on view, newest first in the list under the charts.
function setAnomaly(a) {
  const i = dashboard.anomalies.findIndex((x) => x.id === a.id);
  if (i >= 0) dashboard.anomalies[i] = a;
  else dashboard.anomalies.push(a);
  const body = $("#anomaly-list tbody");
  const rows = dashboard.anomalies.slice(-20).reverse().map((x) => {
    const tr = document.createElement("tr");
    for (const text of [new Date(x.ts_ms).toLocaleString(), x.kind, x.sensor ?? "(device)", x.score.toFixed(2), x.detail]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    return tr;
  });
  body.replaceChildren(...rows);
}

async function loadAnomalies() {
  const id = state.route.id;
  const page = await api(`/api/v1/anomalies?device=${encodeURIComponent(id)}&since=-7d&limit=10000`);
  if (state.route.id !== id) return;
  // Merged, not replaced: one the live feed brought while this request was under way (raised
  // after the store answered) must stay, on the charts and in the list.
  for (const a of page.anomalies) setAnomaly(a);
  redrawCharts();
}

function renderFacts(d) {
  const facts = [
    ["State", stateOf(d)],
    ["Link", d.link ? `${d.link} ${d.peer || ""}` : "–"],
    ["Firmware", d.firmware_version || "–"],
    ["Epoch", d.epoch ?? "–"],
    ["Last seq", d.last_seq],
    ["Last seen", ago(d.last_seen_ms)],
    ["Frames stored", fmt(d.frames_total)],
  ];
  const dl = $("#device-facts");
  dl.replaceChildren(
    ...facts.flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = String(v);
      return [dt, dd];
    }),
  );
}

async function loadDevice() {
  const id = state.route.id;
  const d = await api(`/api/v1/devices/${encodeURIComponent(id)}`);
  if (state.route.id !== id) return;
  state.devices.set(id, d);
  renderFacts(d);
  return d;
}

async function loadHistory() {
  const id = state.route.id;
  const range = state.range;
  const step = Math.max(1000, Math.round(range / 300));
  const from = Date.now() - range;
  const url = `/api/v1/devices/${encodeURIComponent(id)}/readings?from=${from}&step=${step}ms&order=asc&limit=10000`;
  const page = await api(url);
  if (state.route.id !== id || state.range !== range) return;
  const bySensor = {};
  for (const b of page.buckets) (bySensor[b.sensor] ||= []).push([b.ts_ms, b.avg]);
  dashboard.history = {};
  for (const sensor of Object.keys(bySensor)) {
    chartFor(sensor);
    dashboard.history[sensor] = bySensor[sensor].map((p) => p.slice());
    // Live points that arrived meanwhile and are newer than the history stay.
    const newest = bySensor[sensor][bySensor[sensor].length - 1][0];
    const live = (dashboard.charts[sensor] || []).filter((p) => p[0] > newest + step);
    dashboard.charts[sensor] = [...bySensor[sensor], ...live];
  }
  dashboard.historyUrl = url;
  redrawCharts();
}

async function loadEvents() {
  const id = state.route.id;
  const page = await api(`/api/v1/devices/${encodeURIComponent(id)}/events?from=-7d&limit=10000`);
  if (state.route.id !== id) return;
  const body = $("#events tbody");
  body.replaceChildren();
  for (const e of page.events.slice(-20)) addEvent(e);
}

function addEvent(e) {
  const body = $("#events tbody");
  const tr = document.createElement("tr");
  for (const text of [new Date(e.ts_ms).toLocaleString(), e.severity, e.kind, e.message]) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.append(td);
  }
  body.prepend(tr);
  while (body.children.length > 20) body.lastChild.remove();
}

for (const button of document.querySelectorAll("[data-range]")) {
  button.addEventListener("click", () => {
    state.range = +button.dataset.range;
    for (const b of document.querySelectorAll("[data-range]")) b.setAttribute("aria-pressed", String(b === button));
    for (const sensor of Object.keys(dashboard.charts)) dashboard.charts[sensor] = [];
    loadHistory().catch(offline);
  });
}

$("#command-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const out = $("#cmd-outcome");
  let params;
  try {
    params = JSON.parse($("#cmd-params").value || "null");
  } catch (err) {
    out.textContent = `Params are not JSON: ${err.message}`;
    return;
  }
  const body = { name: $("#cmd-name").value.trim(), params, timeout_ms: +$("#cmd-timeout").value || 10000 };
  out.textContent = "sent, waiting for the outcome…";
  $("#cmd-detail").textContent = "";
  try {
    const c = await api(`/api/v1/devices/${encodeURIComponent(state.route.id)}/commands?wait=true`, {
      method: "POST",
      body: JSON.stringify(body),
    });
    out.textContent = c.status;
    $("#cmd-detail").textContent = c.detail || "";
  } catch (err) {
    out.textContent = `refused: ${err.message}`;
  }
});

$("#revoke").addEventListener("click", () => {
  $("#revoke-confirm").hidden = false;
  $("#revoke-no").focus();
});
$("#revoke-no").addEventListener("click", () => {
  $("#revoke-confirm").hidden = true;
});
$("#revoke-yes").addEventListener("click", async () => {
  $("#revoke-confirm").hidden = true;
  try {
    const r = await api(`/api/v1/devices/${encodeURIComponent(state.route.id)}/revoke`, { method: "POST", body: "{}" });
    $("#revoke-outcome").textContent = r.link_closed ? "revoked; its link was closed" : "revoked";
    await loadDevice();
  } catch (err) {
    $("#revoke-outcome").textContent = `refused: ${err.message}`;
  }
});

// ---- live feed ------------------------------------------------------------------------

function subscription() {
  return state.route.page === "device"
    ? { devices: [state.route.id] }
    : { kinds: ["status"] };
}

function connectLive() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/api/v1/live?token=${encodeURIComponent(state.token)}`);
  state.ws = ws;
  ws.onopen = () => {
    state.wsBackoff = 500;
    setConn(true, "live");
    ws.send(JSON.stringify(subscription()));
    // Whatever happened while offline: read it again.
    refresh().catch(offline);
  };
  ws.onmessage = (e) => onLive(JSON.parse(e.data));
  ws.onclose = () => {
    if (state.ws !== ws) return;
    const wait = state.wsBackoff;
    state.wsBackoff = Math.min(wait * 2, 10000);
    setConn(false, `offline — reconnecting in ${Math.ceil(wait / 1000)} s`);
    setTimeout(connectLive, wait);
  };
}

function onLive(m) {
  switch (m.type) {
    case "telemetry":
      if (state.route.page === "device" && m.device_id === state.route.id) {
        for (const r of m.readings) {
          chartFor(r.sensor);
          dashboard.charts[r.sensor].push([r.ts_ms, r.value]);
        }
        redrawCharts();
      }
      break;
    case "event":
      if (state.route.page === "device" && m.device_id === state.route.id) addEvent(m);
      break;
    case "anomaly":
      if (state.route.page === "device" && m.device_id === state.route.id) {
        setAnomaly(m);
        redrawCharts();
      }
      break;
    case "status": {
      const d = state.devices.get(m.device_id);
      if (d) {
        d.online = m.status === "online";
        if (m.link) d.link = m.link;
        d.last_seen_ms = m.ts_ms;
        refreshRows();
        if (state.route.page === "device" && m.device_id === state.route.id) renderFacts(d);
      }
      break;
    }
    case "lagged":
      // Missed messages: read the state again rather than show a hole.
      refresh().catch(offline);
      break;
  }
}

// ---- routing and polling ----------------------------------------------------------------

function offline(err) {
  if (err instanceof Unauthorized) {
    localStorage.removeItem("gatewayToken");
    showLogin("The token was refused.");
    return;
  }
  setConn(false, "offline — retrying");
}

async function refresh() {
  if (state.route.page === "device") {
    await Promise.all([loadDevice(), loadHistory(), loadEvents(), loadAnomalies()]);
  } else {
    await Promise.all([pollStats(), pollDevices()]);
  }
}

function route() {
  const m = location.hash.match(/^#\/device\/(.+)$/);
  state.route = m ? { page: "device", id: decodeURIComponent(m[1]) } : { page: "overview" };
  $("#overview").hidden = state.route.page !== "overview";
  $("#device").hidden = state.route.page !== "device";
  if (state.route.page === "device") {
    $("#device-title").textContent = state.route.id;
    $("#charts").replaceChildren();
    charts.clear();
    dashboard.charts = {};
    dashboard.history = {};
    dashboard.anomalies = [];
    $("#anomaly-list tbody").replaceChildren();
    dashboard.historyUrl = null;
    $("#cmd-outcome").textContent = "";
    $("#cmd-detail").textContent = "";
    $("#revoke-outcome").textContent = "";
    $("#events tbody").replaceChildren();
  } else {
    state.samples = [];
  }
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(subscription()));
  refresh().catch(offline);
}

function start() {
  if (state.started) return;
  state.started = true;
  window.addEventListener("hashchange", route);
  route();
  connectLive();
  setInterval(() => {
    const poll = state.route.page === "device" ? loadDevice() : pollStats();
    poll.then(() => state.ws?.readyState === WebSocket.OPEN && setConn(true, "live")).catch(offline);
    if (state.route.page === "device") redrawCharts();
    else renderTable();
  }, 1000);
  setInterval(() => {
    if (state.route.page === "overview") pollDevices().catch(offline);
  }, 3000);
}

if (state.token) {
  api("/api/v1/stats").then(start, (err) => {
    if (err instanceof Unauthorized) {
      localStorage.removeItem("gatewayToken");
      showLogin("The saved token was refused.");
    } else {
      // The gateway may be restarting: start anyway, the pollers keep trying.
      start();
      offline(err);
    }
  });
} else {
  showLogin();
}
