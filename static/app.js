// The live page: microphone -> voxaffect-client (its AudioWorklet: mono, 16 kHz, PCM16, 100 ms
// chunks; its session: Socket.IO, resume after a dropped connection, the chunks recorded
// meanwhile kept, replayed duplicates dropped) -> charts. This file is the page's UI only.
import { connect } from "voxaffect-client";
import { startMic } from "voxaffect-client/mic";

const { HeatStrip, StressChart, UtteranceBands, renderDistribution, renderComponents, download, fmt } = window.Views;
const $ = id => document.getElementById(id);
const MAX_RESULTS = 20000;        // about five and a half hours of 1 s hops

const state = {
  session: null, info: null, token: "",
  sessionId: null, resumeToken: null,
  results: [], capture: null, fileTimeline: null,
};
const heat = new HeatStrip($("heat"));
const stressChart = new StressChart($("stress-chart"));
const bands = new UtteranceBands($("bands"), $("band-tip"));
renderDistribution($("distribution"), null);
renderComponents($("components"), null);

// --- messages to the person ---------------------------------------------------------------------

const ERROR_WORDS = {
  UNAUTHORIZED: "The server needs an API token. Enter it at the top right and press Start again.",
  RATE_LIMITED: "The server asked this page to slow down; a little audio was dropped.",
  SESSION_LIMIT: "The server is at its session limit. Try again in a moment.",
  UNKNOWN_SESSION: "The server no longer knows this session (it may have timed out). Press Start for a new one.",
  INFERENCE_FAILED: "The server could not analyse a window of audio; it carries on with the next.",
  INFERENCE_TIMEOUT: "The server took too long on a window of audio; it carries on with the next.",
  PAYLOAD_TOO_LARGE: "That was too large for the server.",
};

function say(text, kind = "error", ttlMs = 9000) {
  const node = Views.el("div", { class: `banner ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
  const box = $("errors");
  box.append(node);
  while (box.children.length > 4) box.firstChild.remove();
  if (ttlMs) setTimeout(() => node.remove(), ttlMs);
}

function explain(error) {  // a server error, or the package's VoxaffectError around one
  const message = (error.details && error.details.message) || error.message;
  const words = ERROR_WORDS[error.code];
  return words ? `${words} (${error.code}: ${message})` : `Server error ${error.code}: ${message}`;
}

function setConnection(text, stateName) {
  $("connection").textContent = text;
  $("connection").dataset.state = stateName;
}

// --- server connection (voxaffect-client: connect, resume, dedupe) ---------------------------------

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function loadInfo() {
  try {
    const res = await fetch("/api/info");
    state.info = await res.json();
  } catch (e) {
    setConnection("unreachable", "error");
    say("Cannot reach the voxaffect server. Check that it is running, then reload this page.");
    return;
  }
  const m = state.info.model;
  const tuned = m.tuning && m.tuning.windows_per_s ? ` · ${fmt(m.tuning.windows_per_s, 1)} windows/s measured` : "";
  $("model").textContent = `${m.random_weights ? "random-weight model" : m.source.split("/").pop()} · ${m.device} ${m.dtype} · batch ${m.max_batch}${tuned}`;
  $("model").title = "dtype, batch size and CPU lanes are measured on this machine at start (cached)";
  $("random-warning").hidden = !m.random_weights;
  $("random-note").hidden = !m.random_weights;
  if (state.info.auth_required) $("token-box").hidden = false;
  setConnection("online", "online");
}

async function openSession() {
  const session = await connect({
    url: location.origin, token: state.token || null, reconnectionDelayMax: 4000,
    maxBufferedBytes: 60 * 32000, // a minute of audio kept while reconnecting
  });
  state.session = session;
  window.voxaffectSocket = session.socket;
  session.on("result", onResult);
  session.on("utterance", onUtterance);
  session.on("vad", v => setSpeech(v.speech));
  session.on("error", e => say(explain(e)));
  session.on("reconnecting", e => {
    if (e.attempt > 0) setConnection("unreachable — retrying", "error");
    else setConnection("reconnecting…", "warn");
  });
  session.on("resumed", e => {
    setConnection("connected", "online");
    if (e.replayed) say(`Reconnected: ${e.replayed} result(s) made while offline were recovered.`, "info", 5000);
  });
  session.on("summary", s => {
    $("timeline-info").textContent =
      `Session ended: ${s.results} windows analysed over ${fmt(s.duration_s)} s (${fmt(s.speech_s)} s of speech); ` +
      `stress mean ${fmt(s.stress && s.stress.mean)}, peak ${fmt(s.stress && s.stress.max)}.` +
      (s.utterances ? ` ${s.utterances.count} utterance(s), mostly ${s.utterances.dominant_emotion || "–"}.` : "");
  });
  return session;
}

// --- results ------------------------------------------------------------------------------------

function onResult(r) {  // once each, in order: the package drops replayed duplicates
  state.results.push(r);
  if (state.results.length > MAX_RESULTS) state.results.shift();
  show(r);
  heat.push(r);
  stressChart.push(r);
  bands.reach(r.end_s);
  $("export-csv").disabled = $("export-json").disabled = false;
}

function onUtterance(u) {
  bands.push(u);
  $("utterance-info").textContent = `${bands.count} utterance(s); the last, ${fmt(u.start_s)}–${fmt(u.end_s)} s: ` +
    `${u.emotion} ${(u.confidence * 100).toFixed(0)}%, stress ${fmt(u.stress.index, 0)}.`;
}

function show(r) {
  $("emotion").textContent = r.emotion;
  $("emotion").style.color = Views.EMOTION_COLORS[r.emotion];
  $("confidence").textContent = `${(r.confidence * 100).toFixed(0)}% confidence`;
  renderDistribution($("distribution"), r);
  $("derived-info").textContent = Views.derived(r.circumplex);
  $("window-info").textContent = `${fmt(r.start_s)}–${fmt(r.end_s)} s · ${(r.speech_ratio * 100).toFixed(0)}% speech · ${r.device}` +
    (r.latency_ms != null ? ` · ${r.latency_ms.toFixed(0)} ms` : "") + (r.narrowband ? " · narrowband" : "") +
    Views.thinned(r, state.info && state.info.config.hop_s);
  $("stress-value").textContent = fmt(r.stress.index, 0);
  $("stress-level").textContent = r.stress.level;
  $("stress-level").dataset.level = r.stress.level;
  $("stress-conf").textContent = `confidence ${(r.stress.confidence * 100).toFixed(0)}%${r.stress.calibrating ? " · calibrating" : ""}`;
  renderComponents($("components"), r.stress);
  $("timeline-info").textContent = `${state.results.length || stressChart.points} windows so far.`;
}

function setSpeech(speaking) {
  $("speech").textContent = speaking ? "speech" : "silence";
  $("speech").dataset.state = speaking ? "speech" : "silence";
}

// --- capture ------------------------------------------------------------------------------------

async function start() {
  $("start").disabled = true;
  const early = []; // chunks captured before the session is open
  let mic;
  try {
    mic = await startMic({
      onChunk: pcm => (state.session ? state.session.send(pcm) : early.push(pcm)),
      onLevel: db => { $("level").style.width = `${Math.max(0, Math.min(100, (db + 60) * 100 / 60))}%`; },
    });
  } catch (e) {
    $("start").disabled = false;
    const words = e.name === "NotAllowedError" ? "Microphone access was denied. Allow it for this site in the browser's settings and press Start again."
      : e.name === "NotFoundError" ? "No microphone was found. Connect one and press Start again."
      : `The microphone could not be opened (${e.name}: ${e.message}).`;
    say(words);
    return;
  }
  state.capture = { mic, format: { inputRate: mic.inputRate, outputRate: mic.outputRate } };
  let session;
  try {
    session = await openSession();
  } catch (e) {
    stopCapture();
    $("start").disabled = false;
    if (e.code === "UNAUTHORIZED") { setConnection("token needed", "error"); $("token-box").hidden = false; }
    say(e.code ? explain(e) : String(e));
    return;
  }
  state.sessionId = session.id;
  state.resumeToken = session.resumeToken;
  state.results = [];
  state.fileTimeline = null;
  heat.clear(); stressChart.clear(); bands.clear();
  $("utterance-info").textContent = "";
  setConnection("connected", "online");
  $("stop").disabled = false;
  setSpeech(false);
  early.forEach(pcm => session.send(pcm));
}

function stopCapture() {
  if (!state.capture) return;
  state.capture.mic.stop();
  state.capture = null;
  $("level").style.width = "0%";
}

function stop() {
  stopCapture();
  $("stop").disabled = true;
  $("start").disabled = false;
  $("speech").textContent = "not listening";
  $("speech").dataset.state = "idle";
  const session = state.session;
  state.session = null;
  if (session) session.end().catch(e => say(e.code ? explain(e) : String(e)));
}

// --- files and export ---------------------------------------------------------------------------

async function analyseFile(file) {
  if (!file) return;
  say(`Analysing ${file.name}…`, "info", 4000);
  const form = new FormData();
  form.append("file", file);
  let res;
  try {
    res = await fetch("/api/analyze", { method: "POST", body: form, headers: authHeaders() });
  } catch (e) {
    say("Cannot reach the server to analyse the file.");
    return;
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) { say(body.error ? explain(body.error) : `The server answered ${res.status}.`); return; }
  state.fileTimeline = body;
  state.sessionId = null;
  heat.setAll(body.frames);
  stressChart.setAll(body.frames);
  bands.setAll(body.utterances || []);
  bands.reach(body.summary.duration_s || 0);
  $("utterance-info").textContent = body.utterances ? `${body.utterances.length} utterance(s).` : "Utterances are off on this server.";
  if (body.frames.length) show(body.frames[body.frames.length - 1]);
  $("timeline-info").textContent = `${file.name}: ${body.frames.length} windows over ${fmt(body.summary.duration_s)} s; ` +
    `dominant ${body.summary.dominant_emotion || "–"}, stress mean ${fmt(body.summary.stress.mean)}.`;
  $("export-csv").disabled = $("export-json").disabled = body.frames.length === 0;
}

async function exportTimeline(format) {
  if (state.fileTimeline) {
    const name = (state.fileTimeline.file || "timeline").replace(/\.[^.]+$/, "");
    if (format === "json") {
      download(`${name}.json`, JSON.stringify(state.fileTimeline, null, 2), "application/json");
      return;
    }
    // CSV is written by the server only, by the same code as a stored session's
    const res = await fetch("/api/csv", {
      method: "POST", body: JSON.stringify(state.fileTimeline),
      headers: { ...authHeaders(), "Content-Type": "application/json" },
    });
    if (!res.ok) { say(`Export failed: the server answered ${res.status}.`); return; }
    download(`${name}.csv`, await res.text(), "text/csv");
    return;
  }
  if (!state.sessionId) return;
  // The stored timeline is the reference: what the server kept is what is exported. The
  // session's resume token lets its own client read it without a supervisor token.
  const headers = { ...authHeaders(), "X-Resume-Token": state.resumeToken || "" };
  const res = await fetch(`/api/sessions/${state.sessionId}?format=${format}`, { headers });
  if (!res.ok) { say(`Export failed: the server answered ${res.status}.`); return; }
  const type = format === "csv" ? "text/csv" : "application/json";
  download(`voxaffect-${state.sessionId}.${format}`, await res.text(), type);
}

// --- wiring -------------------------------------------------------------------------------------

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
$("file").addEventListener("change", e => analyseFile(e.target.files[0]));
$("export-csv").addEventListener("click", () => exportTimeline("csv"));
$("export-json").addEventListener("click", () => exportTimeline("json"));
$("token").addEventListener("change", e => {
  state.token = e.target.value.trim(); // used from the next Start
  localStorage.setItem("voxaffect-token", state.token);
});

state.token = new URLSearchParams(location.search).get("token") || localStorage.getItem("voxaffect-token") || "";
$("token").value = state.token;
loadInfo();
window.voxaffect = { state, heat, stressChart, bands }; // for tests and curious people
