// The live page: microphone -> AudioWorklet (mono, 16 kHz, PCM16, 100 ms chunks) -> Socket.IO,
// results -> charts. Survives a dropped connection: it resumes the session with its token and
// the last seq it holds, keeps the chunks recorded meanwhile, and drops replayed duplicates.
"use strict";

const { HeatStrip, StressChart, renderDistribution, renderComponents, download, fmt } = window.Views;
const $ = id => document.getElementById(id);
const MAX_QUEUED_CHUNKS = 600;    // a minute of audio kept while reconnecting
const MAX_RESULTS = 20000;        // about five and a half hours of 1 s hops

const state = {
  socket: null, info: null, token: "",
  sessionId: null, resumeToken: null, lastSeq: 0, resumed: true,
  results: [], queue: [], capture: null, fileTimeline: null,
};
const heat = new HeatStrip($("heat"));
const stressChart = new StressChart($("stress-chart"));
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

function explain(error) {
  const words = ERROR_WORDS[error.code];
  return words ? `${words} (${error.code}: ${error.message})` : `Server error ${error.code}: ${error.message}`;
}

function setConnection(text, stateName) {
  $("connection").textContent = text;
  $("connection").dataset.state = stateName;
}

// --- server connection --------------------------------------------------------------------------

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
}

function connect() {
  const socket = io({ auth: cb => cb({ token: state.token || null }), transports: ["websocket"], reconnectionDelayMax: 4000 });
  state.socket = socket;
  window.voxaffectSocket = socket;
  socket.on("connect", () => {
    setConnection("connected", "online");
    if (state.sessionId && state.resumeToken) resume();
  });
  socket.on("disconnect", reason => {
    setConnection(state.sessionId ? "reconnecting…" : "offline", "warn");
    if (state.sessionId) state.resumed = false;
    if (reason === "io server disconnect") socket.connect();
  });
  socket.on("connect_error", err => {
    const code = err && err.data && err.data.code;
    if (code === "UNAUTHORIZED") {
      setConnection("token needed", "error");
      $("token-box").hidden = false;
      say(ERROR_WORDS.UNAUTHORIZED);
      socket.disconnect();
    } else {
      setConnection("unreachable — retrying", "error");
    }
  });
  socket.on("emotion_result", onResult);
  socket.on("vad", v => { if (v.session_id === state.sessionId) setSpeech(v.speech); });
  socket.on("error", e => say(explain(e)));
  socket.on("session_summary", s => {
    if (s.session_id !== state.sessionId) return;
    $("timeline-info").textContent =
      `Session ended: ${s.results} windows analysed over ${fmt(s.duration_s)} s (${fmt(s.speech_s)} s of speech); ` +
      `stress mean ${fmt(s.stress && s.stress.mean)}, peak ${fmt(s.stress && s.stress.max)}.`;
  });
}

function resume() {
  state.socket.emit("start_session", { resume_token: state.resumeToken, since_seq: state.lastSeq }, ack => {
    if (ack.error) { say(explain(ack.error)); state.sessionId = null; stopCapture(); return; }
    state.resumed = true;
    if (ack.replayed) say(`Reconnected: ${ack.replayed} result(s) made while offline were recovered.`, "info", 5000);
    flushQueue();
  });
}

// --- results ------------------------------------------------------------------------------------

function onResult(r) {
  if (r.session_id !== state.sessionId || r.seq <= state.lastSeq) return; // another session, or a replayed duplicate
  state.lastSeq = r.seq;
  state.results.push(r);
  if (state.results.length > MAX_RESULTS) state.results.shift();
  show(r);
  heat.push(r);
  stressChart.push(r);
  $("export-csv").disabled = $("export-json").disabled = false;
}

function show(r) {
  $("emotion").textContent = r.emotion;
  $("emotion").style.color = Views.EMOTION_COLORS[r.emotion];
  $("confidence").textContent = `${(r.confidence * 100).toFixed(0)}% confidence`;
  renderDistribution($("distribution"), r);
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
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (e) {
    $("start").disabled = false;
    const words = e.name === "NotAllowedError" ? "Microphone access was denied. Allow it for this site in the browser's settings and press Start again."
      : e.name === "NotFoundError" ? "No microphone was found. Connect one and press Start again."
      : `The microphone could not be opened (${e.name}: ${e.message}).`;
    say(words);
    return;
  }
  // The context is made (and resumed) only now, after the permission prompt.
  const ctx = new AudioContext();
  await ctx.resume();
  await ctx.audioWorklet.addModule("/static/worklet.js");
  const source = ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(ctx, "pcm16-capture", { processorOptions: { chunkMs: 100 } });
  const mute = ctx.createGain();
  mute.gain.value = 0;
  source.connect(node).connect(mute).connect(ctx.destination); // pulled by the graph, never heard
  state.capture = { ctx, stream, node };
  node.port.onmessage = e => {
    if (e.data.type === "format") { state.capture.format = e.data; return; }
    $("level").style.width = `${Math.max(0, Math.min(100, (e.data.levelDb + 60) * 100 / 60))}%`;
    send(e.data.pcm);
  };

  state.socket.emit("start_session", { sample_rate: 16000, encoding: "pcm_s16le", channels: 1 }, ack => {
    if (ack.error) { say(explain(ack.error)); stopCapture(); $("start").disabled = false; return; }
    state.sessionId = ack.session_id;
    state.resumeToken = ack.resume_token;
    state.lastSeq = 0;
    state.results = [];
    state.fileTimeline = null;
    state.resumed = true;
    heat.clear(); stressChart.clear();
    $("stop").disabled = false;
    setSpeech(false);
    flushQueue();
  });
}

function send(pcm) {
  state.queue.push(pcm.buffer);
  if (state.queue.length > MAX_QUEUED_CHUNKS) state.queue.shift();
  flushQueue();
}

function flushQueue() {
  const s = state.socket;
  while (state.sessionId && state.resumed && s.connected && state.queue.length) {
    s.emit("audio_stream", { session_id: state.sessionId, chunk: state.queue.shift() });
  }
}

function stopCapture() {
  if (!state.capture) return;
  state.capture.node.port.onmessage = null; // chunks still in flight from the worklet are dropped
  state.capture.node.disconnect();
  state.capture.stream.getTracks().forEach(t => t.stop());
  state.capture.ctx.close();
  state.capture = null;
  $("level").style.width = "0%";
}

function stop() {
  stopCapture();
  flushQueue();
  state.queue = []; // nothing may follow end_session (the server would answer UNKNOWN_SESSION)
  $("stop").disabled = true;
  $("start").disabled = false;
  $("speech").textContent = "not listening";
  $("speech").dataset.state = "idle";
  if (state.sessionId) {
    state.socket.emit("end_session", { session_id: state.sessionId }, ack => { if (ack && ack.error) say(explain(ack.error)); });
  }
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
  state.token = e.target.value.trim();
  localStorage.setItem("voxaffect-token", state.token);
  state.socket.disconnect().connect();
});

state.token = new URLSearchParams(location.search).get("token") || localStorage.getItem("voxaffect-token") || "";
$("token").value = state.token;
loadInfo().then(connect);
window.voxaffect = { state, heat, stressChart }; // for tests and curious people
