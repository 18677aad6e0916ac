// Supervisor monitor: every active session with its current emotion and stress, updating live;
// click one for its live charts. Needs an API token (the server refuses monitoring without one).
// The connection is voxaffect-client's watch(); this file is the monitor's UI.
import { watch } from "voxaffect-client";

const { HeatStrip, StressChart, UtteranceBands, renderDistribution, renderComponents, fmt, el } = window.Views;
const $ = id => document.getElementById(id);
const sessions = new Map();   // session_id -> last known state
const MAX_HISTORY = 2000;
let selected = null;
let history = [];             // the selected session's results, every party
let track = null;             // the party shown, for calls analysed per party (customer, agent)
let heat = null, stressChart = null, bands = null, monitor = null;
const alerts = new Map();     // alert id -> the active (firing) alert
const TITLE = document.title;
let focusAt = null;           // audio time to show once the selected session's results arrive
let token = new URLSearchParams(location.search).get("token") || localStorage.getItem("voxaffect-token") || "";
$("token").value = token;

function say(text, kind = "error") {
  const node = el("div", { class: `banner ${kind}`, role: "alert" }, text);
  $("errors").replaceChildren(node);
}

function setConnection(text, stateName) {
  $("connection").textContent = text;
  $("connection").dataset.state = stateName;
}

function row(s) {
  const last = s.last;
  const stress = last ? last.stress : null;
  const tr = el("tr", { class: "session" + (s.session_id === selected ? " selected" : ""), "data-session": s.session_id },
    el("td", {}, s.session_id.slice(0, 12)),
    el("td", {}, s.meta && s.meta.call_sid ? `${s.source} · ${s.meta.call_sid}` : s.source),
    el("td", {}, `${fmt(s.audio_s, 0)} s`),
    el("td", { style: last ? `color:${Views.EMOTION_COLORS[last.emotion]}` : "" },
      last ? `${last.emotion} ${(last.confidence * 100).toFixed(0)}%${last.track ? " · " + last.track : ""}` : "–"),
    el("td", {}, stress ? fmt(stress.index, 0) : "–"),
    el("td", {}, stress ? el("span", { class: "level", "data-level": stress.level }, stress.level) : "–"),
    el("td", { class: "muted" }, s.connected === false ? "reconnecting" : "live"));
  tr.addEventListener("click", () => select(s.session_id));
  return tr;
}

let renderPending = false;
function renderTable() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    const rows = [...sessions.values()].sort((a, b) => b.started_at - a.started_at).map(row);
    $("sessions").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No active sessions."))]));
    $("count").textContent = `${sessions.size} live`;
  });
}

function showResult(r) {
  $("emotion").textContent = r.emotion;
  $("emotion").style.color = Views.EMOTION_COLORS[r.emotion];
  $("confidence").textContent = `${(r.confidence * 100).toFixed(0)}%`;
  renderDistribution($("distribution"), r);
  $("derived-info").textContent = Views.derived(r.circumplex);
  $("stress-value").textContent = fmt(r.stress.index, 0);
  $("stress-level").textContent = r.stress.level;
  $("stress-level").dataset.level = r.stress.level;
  $("stress-conf").textContent = `confidence ${(r.stress.confidence * 100).toFixed(0)}%`;
  renderComponents($("components"), r.stress);
  $("detail-info").textContent = `${fmt(r.end_s)} s · window ${r.seq}${r.track ? " · " + r.track : ""}` +
    Views.thinned(r, hopS);
}

// A call analysed per party has one timeline per track: the charts show one party at a time.
function renderTracks() {
  const names = [...new Set(history.map(r => r.track).filter(Boolean))];
  if (track === null && names.length) track = names.includes("customer") ? "customer" : names[0];
  $("tracks").hidden = names.length < 2;
  $("tracks").replaceChildren(...names.map(name => {
    const button = el("button", { "data-track": name, "aria-pressed": String(name === track) }, name);
    button.addEventListener("click", () => { track = name; redraw(); });
    return button;
  }));
}

function renderAlerts() {
  const list = [...alerts.values()].sort((a, b) => b.fired_at - a.fired_at);
  $("alerts-card").hidden = list.length === 0;
  $("alert-count").textContent = list.length ? `${list.length}` : "";
  document.title = list.length ? `(${list.length}) ${TITLE}` : TITLE;
  $("alerts").replaceChildren(...list.map(a => {
    const at = `${Math.floor(a.fired_audio_s / 60)}:${String(Math.floor(a.fired_audio_s % 60)).padStart(2, "0")}`;
    const item = el("li", { "data-severity": a.severity, "data-id": a.id,
      title: `${a.when} — click to open the call at ${at}` },
      el("span", { class: "rule" }, a.rule),
      `${a.evidence} · ${a.session_id}${a.track ? " (" + a.track + ")" : ""} · at ${at}`,
      a.random_weights ? el("span", { class: "muted small" }, " · random-weight model") : "");
    item.addEventListener("click", () => { focusAt = a.fired_audio_s; select(a.session_id); });
    return item;
  }));
}

function onAlert(a) {
  if (a.state === "firing") {
    const fresh = !alerts.has(a.id);
    alerts.set(a.id, a);
    if (fresh) {  // make it noticed: the card flashes, the tab title counts
      $("alerts-card").classList.remove("flash");
      void $("alerts-card").offsetWidth;
      $("alerts-card").classList.add("flash");
    }
  } else alerts.delete(a.id);
  renderAlerts();
}

function loadAlerts() {
  const since = Date.now() / 1000 - 6 * 3600;
  fetch(`/api/alerts?since=${since}&limit=200`, { headers: token ? { Authorization: `Bearer ${token}` } : {} })
    .then(r => r.ok ? r.json() : { alerts: [] })
    .then(body => { for (const a of body.alerts.reverse()) if (a.state === "firing") alerts.set(a.id, a); renderAlerts(); })
    .catch(() => {});
}

function redraw() {
  renderTracks();
  const shown = history.filter(r => !track || r.track === track);
  heat.setAll(shown);
  stressChart.setAll(shown);
  if (shown.length) showResult(shown[shown.length - 1]);
  if (focusAt !== null && stressChart.plot) {  // opened from an alert: its moment, centred
    stressChart.plot.setScale("x", { min: focusAt - 20, max: focusAt + 10 });
    $("detail-info").textContent = `alert at ${focusAt.toFixed(0)} s`;
    focusAt = null;
  }
}

function select(id) {
  if (selected && selected !== id) monitor.unsubscribe(selected);
  if (id !== selected) { history = []; track = null; if (bands) bands.clear(); }
  selected = id;
  $("detail").hidden = false;
  $("detail-id").textContent = id;
  if (!heat) {
    heat = new HeatStrip($("heat"));
    stressChart = new StressChart($("stress-chart"));
    bands = new UtteranceBands($("bands"), $("band-tip"));
  }
  renderDynamics(sessions.get(id));
  monitor.subscribe(id).then(recent => {
    history = recent.slice(-MAX_HISTORY);
    redraw();
  }, err => say(err.details.message || err.message));
  // the utterances so far are stored (live ones are not replayed); new ones arrive as events
  fetch(`/api/sessions/${encodeURIComponent(id)}`, { headers: token ? { Authorization: `Bearer ${token}` } : {} })
    .then(r => r.ok ? r.json() : { utterances: [] })
    .then(stored => { if (selected === id) for (const u of stored.utterances || []) bands.push(u); })
    .catch(() => {});
  renderTable();
}

// The conversation so far (the server's, as of each party's last pause): talk, overtalk, turns.
function renderDynamics(s) {
  const d = s && s.dynamics;
  if (!d) { $("dynamics").replaceChildren(el("span", {}, "Call dynamics: after the first pause.")); return; }
  const parties = Object.entries(d.parties).map(([name, p]) =>
    el("span", { "data-party": name }, `${name}: talk ${fmt(p.talk_s, 0)} s (${(p.talk_ratio * 100).toFixed(0)}%), ` +
      `${p.turns} turns, ${p.interruptions} interruptions`));
  $("dynamics").replaceChildren(...parties,
    el("span", {}, `overtalk ${fmt(d.overtalk_s, 1)} s in ${d.overtalk_count}`),
    el("span", {}, `longest silence ${fmt(d.longest_silence_s, 1)} s`));
}

function onUtterance(u) {
  if (u.session_id === selected && bands) bands.push(u);
}

function onResult(r) {
  if (r.session_id !== selected) return;
  history.push(r);
  if (history.length > MAX_HISTORY) history.shift();
  if (r.track && !$("tracks").querySelector(`[data-track="${r.track}"]`)) renderTracks();
  if (track && r.track !== track) return;
  heat.push(r);
  stressChart.push(r);
  bands.reach(r.end_s);
  showResult(r);
}

async function connect() {
  if (monitor) monitor.close();
  monitor = null;
  let opened;
  const listed = sessionsList => {  // at connect and at every reconnect
    $("errors").replaceChildren();
    sessions.clear();
    for (const s of sessionsList) sessions.set(s.session_id, s);
    renderTable();
    loadAlerts();
    if (selected && opened) select(selected);
  };
  try {
    opened = await watch({ url: location.origin, token: token || null });
  } catch (err) {
    if (err.code === "UNAUTHORIZED" && !err.details.message) {  // refused at connect
      setConnection("token needed", "error");
      say("The monitor needs an API token: enter it at the top right.");
    } else if (err.code === "UNAUTHORIZED") {  // connected, but may not list sessions
      say(`${err.details.message || err.message}.`);
      setConnection("no access", "error");
    } else setConnection("unreachable — retrying", "error");
    return;
  }
  monitor = opened;
  setConnection("connected", "online");
  monitor.on("sessions", listed);
  monitor.on("connected", () => setConnection("connected", "online"));
  monitor.on("reconnecting", e => setConnection(e.attempt > 0 ? "unreachable — retrying" : "reconnecting…", e.attempt > 0 ? "error" : "warn"));
  monitor.on("session", u => {
    if (u.event === "ended") sessions.delete(u.session_id);
    else sessions.set(u.session_id, u);
    if (u.session_id === selected) renderDynamics(u);
    renderTable();
  });
  monitor.on("result", onResult);
  monitor.on("utterance", onUtterance);
  monitor.on("alert", onAlert);
  monitor.on("error", e => say(`Server error ${e.code}: ${e.details.message || e.message}`));
  listed(monitor.sessions);
}

$("token").addEventListener("change", e => {
  token = e.target.value.trim();
  localStorage.setItem("voxaffect-token", token);
  connect();
});

let hopS = null;              // the configured hop: results further apart were thinned
fetch("/api/info").then(r => r.json()).then(info => {
  const m = info.model;
  hopS = info.config.hop_s;
  $("model").textContent = `${m.random_weights ? "random-weight model" : m.source.split("/").pop()} · ${m.device} ${m.dtype}`;
  $("random-warning").hidden = !m.random_weights;
  connect();
}).catch(() => { setConnection("unreachable", "error"); say("Cannot reach the voxaffect server."); });

window.monitor = { get alerts() { return alerts; }, get history() { return history; }, get track() { return track; }, get stressChart() { return stressChart; }, get bands() { return bands; } }; // for tests
