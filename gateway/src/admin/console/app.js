// The ECMO gateway console: plain DOM, no framework, no CDN. Everything shown comes from the
// admin API and is written as text (never as HTML): device data cannot inject markup.
"use strict";

const state = { csrf: null, user: null, throughput: [], last: null, timer: null, view: null };
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function notice(text) {
  const box = $("notice");
  box.textContent = text || "";
  box.hidden = !text;
}

/** What an OperationOutcome issue says: its text, else its diagnostics, else its code. */
function issueText(issue) {
  return (issue.details && issue.details.text) || issue.diagnostics || issue.code;
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (!response.ok) {
    const issue = json && json.issue && json.issue[0];
    const why = issue ? issueText(issue) + (issue.expression ? " (" + issue.expression.join(", ") + ")" : "") : response.statusText;
    const error = new Error(why);
    error.status = response.status;
    throw error;
  }
  return json;
}

function when(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "";
}

function badge(text) {
  return el("span", text, "badge " + text);
}

function row(cells, onClick) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell === undefined || cell === null ? "" : String(cell);
    tr.appendChild(td);
  }
  if (onClick) { tr.className = "clickable"; tr.addEventListener("click", onClick); }
  return tr;
}

function fill(tbody, rows, empty) {
  tbody.replaceChildren(...rows);
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = el("td", empty);
    td.colSpan = tbody.parentElement.querySelectorAll("thead th").length;
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
}

// ---- charts (SVG, drawn from numbers only) ----

function lineChart(series, options) {
  const width = options.width || 720, height = options.height || 180, pad = 36;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", options.title || "chart");
  const points = series.flatMap((s) => s.points);
  if (!points.length) {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", pad); t.setAttribute("y", height / 2); t.textContent = "no data yet";
    svg.appendChild(t);
    return svg;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(0, ...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) y1 = y0 + 1;
  const sx = (x) => pad + ((x - x0) / (x1 - x0)) * (width - 2 * pad);
  const sy = (y) => height - pad + 10 - ((y - y0) / (y1 - y0)) * (height - 2 * pad);
  for (const [value, label] of [[y0, y0], [y1, y1]]) {
    const t = document.createElementNS(SVG, "text");
    t.setAttribute("x", 2); t.setAttribute("y", sy(value) + 4); t.setAttribute("font-size", "10");
    t.textContent = Number(label).toFixed(Math.abs(label) < 10 ? 1 : 0);
    svg.appendChild(t);
  }
  const axis = document.createElementNS(SVG, "line");
  axis.setAttribute("x1", pad); axis.setAttribute("x2", width - pad);
  axis.setAttribute("y1", sy(y0)); axis.setAttribute("y2", sy(y0)); axis.setAttribute("stroke", "#a0aec0");
  svg.appendChild(axis);
  for (const s of series) {
    if (!s.points.length) continue;
    const path = document.createElementNS(SVG, "polyline");
    path.setAttribute("fill", "none"); path.setAttribute("stroke", s.color); path.setAttribute("stroke-width", "2");
    path.setAttribute("points", s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
    path.setAttribute("data-series", s.name);
    svg.appendChild(path);
  }
  return svg;
}

function chartBlock(title, series) {
  const block = el("div", null, "chart");
  block.appendChild(el("h4", title));
  const legend = el("div", null, "legend");
  for (const s of series) {
    const item = el("span", "\u25A0 " + s.name);
    item.style.color = s.color;
    legend.appendChild(item);
  }
  block.appendChild(legend);
  block.appendChild(lineChart(series, { title }));
  return block;
}

// ---- overview ----

async function loadOverview() {
  const answer = await api("GET", "/admin/v1/destinations");
  fill($("destinations").tBodies[0], answer.destinations.map((d) => row([
    d.name, badge(d.health), d.breakerOpen ? "open" : "closed", d.pending,
    d.oldestPendingSeconds == null ? "" : d.oldestPendingSeconds.toFixed(1) + " s",
    d.delivered, d.dead, d.format, d.baseUrl,
  ])), "no destinations");
  const now = Date.now();
  const totals = answer.destinations.reduce((t, d) => ({ accepted: t.accepted + d.accepted, delivered: t.delivered + d.delivered }), { accepted: 0, delivered: 0 });
  if (state.last) {
    const seconds = Math.max((now - state.last.at) / 1000, 0.001);
    state.throughput.push({ at: now, accepted: Math.max(0, totals.accepted - state.last.accepted) / seconds, delivered: Math.max(0, totals.delivered - state.last.delivered) / seconds });
    if (state.throughput.length > 150) state.throughput.shift();
  }
  state.last = { at: now, ...totals };
  const series = [
    { name: "accepted", color: "#2b6cb0", points: state.throughput.map((p) => [p.at, p.accepted]) },
    { name: "delivered", color: "#2f855a", points: state.throughput.map((p) => [p.at, p.delivered]) },
  ];
  $("throughput").replaceChildren(chartBlock("messages/s", series));
}

// ---- message browser ----

function searchQuery() {
  const form = new FormData($("search"));
  const query = new URLSearchParams();
  for (const [name, value] of form.entries()) {
    if (!value) continue;
    if (name === "since" || name === "until") query.set(name, new Date(value).toISOString());
    else query.set(name, value);
  }
  return query;
}

async function loadMessages() {
  const answer = await api("GET", "/admin/v1/messages?" + searchQuery().toString());
  fill($("message-list").tBodies[0], answer.messages.map((m) => row([
    m.messageId, when(m.acceptedAtMs), m.trackingId, m.destination, m.resourceType,
    badge(m.state), m.statusLine || m.lastError || "", m.devices.join(", "), m.patients.join(", "), m.runs.join(", "),
  ], () => showMessage(m.messageId))), "no message matches");
}

async function showMessage(id) {
  const m = await api("GET", "/admin/v1/messages/" + encodeURIComponent(id));
  $("detail-id").textContent = m.messageId;
  const facts = $("detail-facts");
  facts.replaceChildren();
  for (const [name, value] of [
    ["Tracking id", m.trackingId], ["Destination", m.destination], ["State", m.state],
    ["Identifier", m.identifier], ["What it did", m.disposition], ["Attempts", m.attempts],
    ["Accepted", when(m.acceptedAtMs)], ["Settled", when(m.settledAtMs)], ["Sender", m.sender],
    ["Devices", (m.devices || []).join(", ")], ["Patients", (m.patients || []).join(", ")], ["Runs", (m.runs || []).join(", ")],
  ]) {
    facts.appendChild(el("dt", name));
    facts.appendChild(el("dd", value));
  }
  $("detail-resource").textContent = JSON.stringify(m.resource, null, 2);
  const answer = [m.statusLine, m.location, m.lastError].filter(Boolean).join("\n");
  $("detail-answer").textContent = (answer || (m.state === "pending" ? "not sent yet" : "")) + (m.outcome ? "\n" + JSON.stringify(m.outcome, null, 2) : "");
  $("message-detail").hidden = false;
}

// ---- dead letters ----

function outcomeText(d) {
  const issues = d.outcome && d.outcome.issue ? d.outcome.issue.map(issueText).join("; ") : "";
  return [d.error, issues].filter(Boolean).join(" \u2014 ");
}

async function loadDeadLetters() {
  const answer = await api("GET", "/admin/v1/dead-letters?limit=500");
  fill($("dead-list").tBodies[0], answer.deadLetters.map((d) => {
    const box = document.createElement("input");
    box.type = "checkbox"; box.value = d.messageId; box.className = "pick";
    box.setAttribute("aria-label", "select message " + d.messageId);
    const replay = el("button", "Replay");
    replay.type = "button";
    replay.addEventListener("click", () => replayOne(d.messageId));
    return row([box, d.messageId, d.destination, d.resourceType + " " + d.identifier, d.attempts, outcomeText(d), replay]);
  }), "no dead letters");
  $("select-all").checked = false;
}

async function replayOne(id) {
  const answer = await api("POST", `/admin/v1/dead-letters/${encodeURIComponent(id)}/replay`);
  notice(`Replayed ${answer.replayed} message(s).`);
  await loadDeadLetters();
}

async function replaySelected() {
  const picked = [...document.querySelectorAll("#dead-list input.pick:checked")].map((b) => b.value);
  let count = 0;
  for (const id of picked) {
    try { count += (await api("POST", `/admin/v1/dead-letters/${encodeURIComponent(id)}/replay`)).replayed; } catch (e) { notice(`Message ${id}: ${e.message}`); }
  }
  notice(`Replayed ${count} message(s).`);
  await loadDeadLetters();
}

async function replayAll() {
  const answer = await api("POST", "/admin/v1/dead-letters/replay");
  notice(`Replayed ${answer.replayed} message(s).`);
  await loadDeadLetters();
}

// ---- runs ----

const RUN_CHARTS = [
  { title: "Blood flow (L/min)", codes: [["pump-blood-flow", "#2b6cb0"], ["pump-blood-flow-setting", "#90cdf4"]] },
  { title: "Pump speed (RPM)", codes: [["pump-speed", "#6b46c1"], ["pump-speed-setting", "#d6bcfa"]] },
  { title: "Pressures (mmHg)", codes: [["drainage-pressure", "#c53030"], ["pre-oxygenator-pressure", "#dd6b20"], ["post-oxygenator-pressure", "#2f855a"]] },
];

async function loadRuns() {
  const answer = await api("GET", "/admin/v1/runs");
  fill($("run-list").tBodies[0], answer.runs.map((r) => row([
    r.runId, badge(r.status), r.mode, r.patient, r.start, r.end, r.consoles.map((c) => c.serial).join(", "),
  ], () => showRun(r.runId))), "no runs");
  if (state.run) await showRun(state.run);
}

async function showRun(runId) {
  state.run = runId;
  const r = await api("GET", "/admin/v1/runs/" + encodeURIComponent(runId));
  $("run-id").textContent = r.runId;
  const facts = $("run-facts");
  facts.replaceChildren();
  for (const [name, value] of [
    ["Status", r.status], ["Mode", r.mode], ["Support", r.supportType], ["Age group", r.ageGroup],
    ["Patient", r.patient], ["Start", r.start], ["End", r.end],
    ["Consoles", r.consoles.map((c) => `${c.manufacturer} ${c.model} ${c.serial}`).join(", ")],
    ["Other devices", r.attachedDevices.map((d) => `${d.manufacturer} ${d.model} ${d.serial} from ${d.from}${d.until ? " until " + d.until : ""}`).join("; ")],
    ["Cannulas", r.cannulas.map((c) => `${c.role}: ${c.site}${c.laterality ? " (" + c.laterality + ")" : ""}`).join("; ")],
    ["Outcome", r.outcome ? `${r.outcome.reason}${r.outcome.alive ? ", alive" : ""}` : ""],
  ]) {
    facts.appendChild(el("dt", name));
    facts.appendChild(el("dd", value));
  }
  const events = [
    ...r.segments.map((s) => ({ time: s.start, text: s.activity + (s.mode ? " " + s.mode : "") + (s.end ? ` until ${s.end}` : "") })),
    ...r.complications.map((c) => ({ time: c.time, text: "complication: " + c.display })),
  ].sort((a, b) => (a.time < b.time ? -1 : 1));
  $("run-events").replaceChildren(...events.map((e) => el("li", `${e.time} ${e.text}`)));
  const charts = $("run-charts");
  charts.replaceChildren();
  for (const chart of RUN_CHARTS) {
    const series = chart.codes.map(([code, color]) => ({
      name: code, color,
      points: r.readings.filter((x) => x.code === code).map((x) => [Date.parse(x.time), x.value]).sort((a, b) => a[0] - b[0]),
    }));
    if (series.some((s) => s.points.length)) charts.appendChild(chartBlock(chart.title, series));
  }
  if (!charts.children.length) charts.appendChild(el("p", "no readings of this run are kept", "hint"));
  $("run-detail").hidden = false;
}

// ---- navigation and sign-in ----

const LOADERS = { overview: loadOverview, messages: loadMessages, "dead-letters": loadDeadLetters, runs: loadRuns };

async function show(view) {
  if (!LOADERS[view]) view = "overview";
  state.view = view;
  for (const section of document.querySelectorAll("section.view")) section.hidden = section.id !== view;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === view);
  clearInterval(state.timer);
  const refresh = async () => {
    try { await LOADERS[view](); } catch (e) {
      if (e.status === 401 || e.status === 403) return signedOut();
      notice(e.message);
    }
  };
  await refresh();
  if (view === "overview" || view === "runs") state.timer = setInterval(refresh, 2000);
}

function signedIn(session) {
  state.csrf = session.csrf; state.user = session.user;
  $("user").textContent = session.user;
  $("login").hidden = true; $("nav").hidden = false; $("who").hidden = false;
  notice("");
  show(location.hash.slice(1));
}

function signedOut() {
  clearInterval(state.timer);
  state.csrf = null;
  for (const section of document.querySelectorAll("section.view")) section.hidden = true;
  $("nav").hidden = true; $("who").hidden = true; $("login").hidden = false;
}

async function start() {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      signedIn(await api("POST", "/console/session", { user: $("login-user").value, password: $("login-password").value }));
      $("login-password").value = "";
    } catch (e) { notice(e.message); }
  });
  $("sign-out").addEventListener("click", async () => { await api("DELETE", "/console/session").catch(() => {}); signedOut(); });
  $("search").addEventListener("submit", (event) => { event.preventDefault(); loadMessages().catch((e) => notice(e.message)); });
  $("replay-selected").addEventListener("click", () => replaySelected().catch((e) => notice(e.message)));
  $("replay-all").addEventListener("click", () => replayAll().catch((e) => notice(e.message)));
  $("select-all").addEventListener("change", (event) => {
    for (const box of document.querySelectorAll("#dead-list input.pick")) box.checked = event.target.checked;
  });
  window.addEventListener("hashchange", () => { if (state.user) show(location.hash.slice(1)); });
  try {
    signedIn(await api("GET", "/console/session"));
  } catch (_) {
    // An admin certificate needs no sign-in: the API answers without a session.
    try { await api("GET", "/admin/v1/destinations"); signedIn({ user: "admin certificate", csrf: null }); } catch (_) { signedOut(); }
  }
}

document.addEventListener("DOMContentLoaded", start);
