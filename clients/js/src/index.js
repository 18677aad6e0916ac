// voxaffect-client: stream audio to a voxaffect server, get each window's emotion and stress.
//
//   const session = await connect({ url, token, sampleRate: 16000 });
//   session.on("result", r => console.log(r.emotion, r.stress.index));
//   session.send(int16Chunk);            // Int16Array | Float32Array (-1..1) | ArrayBuffer
//   const summary = await session.end();
//
// Socket.IO (socket.io-client) carries it, in the browser and in Node. A dropped connection
// reconnects with backoff and resumes the session: results after the last one seen are sent
// again by the server and duplicates are dropped here, so a listener sees every result once, in
// order. Audio sent while disconnected waits in a bounded buffer and goes out on resume; beyond
// the bound, `send` refuses it (returns false) and an `error` with code BUFFER_FULL is emitted.

import { io } from "socket.io-client";

const DEFAULT_BUFFER_BYTES = 1 << 20; // about 32 s of 16 kHz PCM16 while reconnecting
const SERVER_EVENTS = {
  emotion_result: "result",
  utterance_result: "utterance", // each utterance, classified whole (not replayed on resume)
  vad: "vad",
  alert: "alert",
  error: "error",
};

export class VoxaffectError extends Error {
  constructor(code, message, details = {}) {
    super(`${code}: ${message}`);
    this.name = "VoxaffectError";
    this.code = code;
    this.details = details;
  }
}

function toPcm16(audio) {
  if (audio instanceof ArrayBuffer) return audio;
  if (ArrayBuffer.isView(audio) && audio instanceof Int16Array) {
    return audio.buffer.slice(audio.byteOffset, audio.byteOffset + audio.byteLength);
  }
  if (audio instanceof Float32Array) {
    const out = new Int16Array(audio.length);
    for (let i = 0; i < audio.length; i++) {
      const s = Math.max(-1, Math.min(1, audio[i]));
      out[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
    }
    return out.buffer;
  }
  if (ArrayBuffer.isView(audio)) return audio.buffer.slice(audio.byteOffset, audio.byteOffset + audio.byteLength);
  throw new TypeError("send() takes an Int16Array, a Float32Array or an ArrayBuffer");
}

function ack(socket, event, data, timeoutMs) {
  return new Promise((resolve, reject) => {
    socket.timeout(timeoutMs).emit(event, data, (err, reply) => {
      if (err) reject(new VoxaffectError("TIMEOUT", `no answer to ${event} within ${timeoutMs} ms`));
      else if (reply && reply.error) reject(new VoxaffectError(reply.error.code, reply.error.message, reply.error));
      else resolve(reply);
    });
  });
}

/** The first connect, or a VoxaffectError (the server's refusal code, UNREACHABLE, TIMEOUT). */
function connected(socket, timeoutMs) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { socket.disconnect(); reject(new VoxaffectError("TIMEOUT", "could not connect in time")); }, timeoutMs);
    socket.once("connect", () => { clearTimeout(timer); resolve(); });
    socket.once("connect_error", err => {
      clearTimeout(timer);
      socket.disconnect();
      const code = (err && err.data && err.data.code) || "UNREACHABLE";
      reject(new VoxaffectError(code, err.message || "could not connect"));
    });
  });
}

/** Listeners by event name: what a Session and a Monitor share. */
class Emitter {
  constructor() {
    this._listeners = new Map();
  }

  on(event, listener) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(listener);
    return this;
  }

  off(event, listener) {
    this._listeners.get(event)?.delete(listener);
    return this;
  }

  _emit(event, payload) {
    for (const listener of this._listeners.get(event) || []) listener(payload);
  }
}

export class Session extends Emitter {
  /** @internal use connect() */
  constructor(socket, options) {
    super();
    this.socket = socket;
    this.options = options;
    this.id = null;
    this.resumeToken = null;
    this.lastSeq = 0;
    this.config = null;
    this._buffer = [];
    this._bufferBytes = 0;
    this._live = false; // started or resumed on the current connection
    this._ended = false;
    this._summary = null;
    this._summaryWaiters = [];
  }

  /** Queue audio in the session's encoding; false if the reconnect buffer is full. */
  send(audio) {
    if (this._ended) throw new VoxaffectError("SESSION_ENDED", "end() was called");
    const chunk = toPcm16(audio);
    if (this._live && this.socket.connected) {
      this.socket.emit("audio_stream", { session_id: this.id, chunk });
      return true;
    }
    if (this._bufferBytes + chunk.byteLength > this.options.maxBufferedBytes) {
      this._emit("error", new VoxaffectError("BUFFER_FULL", "audio sent while disconnected outgrew maxBufferedBytes; dropped"));
      return false;
    }
    this._buffer.push(chunk);
    this._bufferBytes += chunk.byteLength;
    return true;
  }

  _flush() {
    while (this._live && this.socket.connected && this._buffer.length) {
      const chunk = this._buffer.shift();
      this._bufferBytes -= chunk.byteLength;
      this.socket.emit("audio_stream", { session_id: this.id, chunk });
    }
  }

  /** No more audio: resolves to the session's summary once the server has analysed the rest. */
  async end({ timeoutMs = 60_000 } = {}) {
    if (!this._ended) {
      this._ended = true;
      this._flush();
      await ack(this.socket, "end_session", { session_id: this.id }, timeoutMs);
    }
    const summary = this._summary || (await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new VoxaffectError("TIMEOUT", "no session_summary in time")), timeoutMs);
      this._summaryWaiters.push(s => { clearTimeout(timer); resolve(s); });
    }));
    this.close();
    return summary;
  }

  /** Disconnect without ending the session (it waits on the server to be resumed). */
  close() {
    this.socket.io.reconnection(false);
    this.socket.disconnect();
  }

  _result(r) {
    if (r.session_id !== this.id || r.seq <= this.lastSeq) return; // another session, or a replay
    this.lastSeq = r.seq;
    this._emit("result", r);
  }

  _summaryArrived(s) {
    if (s.session_id !== this.id) return;
    this._summary = s;
    this._emit("summary", s);
    for (const waiter of this._summaryWaiters.splice(0)) waiter(s);
  }
}

/**
 * Connect and start a session (or resume one with `resumeToken`). `token` may be a function
 * ({scope, sessionId}) => string | Promise<string>, called at each (re)connect: a browser gets
 * a short-lived token from its own backend (POST /api/tokens) each time.
 */
export async function connect(options) {
  const opts = {
    sampleRate: 16000,
    encoding: "pcm_s16le",
    channels: 1,
    maxBufferedBytes: DEFAULT_BUFFER_BYTES,
    timeoutMs: 30_000,
    reconnectionDelayMax: 5000,
    ...options,
  };
  if (!opts.url) throw new TypeError("connect() needs {url}");
  let session;
  const tokenFor = async () => {
    if (typeof opts.token !== "function") return opts.token || null;
    const resuming = session && session.id;
    return opts.token({ scope: resuming ? "resume" : "start", sessionId: resuming ? session.id : opts.sessionId || null });
  };
  const socket = io(opts.url, {
    transports: ["websocket"],
    reconnectionDelay: 500,
    reconnectionDelayMax: opts.reconnectionDelayMax,
    randomizationFactor: 0.5,
    auth: cb => { tokenFor().then(token => cb({ token }), () => cb({ token: null })); },
    ...opts.socketOptions,
  });
  session = new Session(socket, opts);
  for (const [name, event] of Object.entries(SERVER_EVENTS)) {
    if (name === "emotion_result") continue;
    socket.on(name, payload => {
      // (an error is this connection's own, whatever session it names: a bad message's)
      if (name !== "error" && payload && payload.session_id && payload.session_id !== session.id) return;
      // a draining node hands the session off: hold the audio until resumed on another node
      if (name === "error" && payload && payload.code === "DRAINING" && payload.resume) session._live = false;
      session._emit(event, name === "error" ? new VoxaffectError(payload.code, payload.message, payload) : payload);
    });
  }
  socket.on("emotion_result", r => session._result(r));
  socket.on("session_summary", s => session._summaryArrived(s));

  await connected(socket, opts.timeoutMs);
  const start = opts.resumeToken
    ? { resume_token: opts.resumeToken, session_id: opts.sessionId, since_seq: opts.sinceSeq || 0 }
    : { session_id: opts.sessionId, sample_rate: opts.sampleRate, encoding: opts.encoding, channels: opts.channels, options: opts.options };
  let started;
  try {
    started = await ack(socket, "start_session", start, opts.timeoutMs);
  } catch (err) {
    socket.disconnect();
    throw err;
  }
  Object.assign(session, { id: started.session_id, resumeToken: started.resume_token, config: started.config, lastSeq: opts.sinceSeq || 0 });
  session._live = true;

  socket.on("disconnect", reason => {
    session._live = false;
    if (session._ended && reason === "io client disconnect") return;
    session._emit("reconnecting", { reason, attempt: 0 });
    if (reason === "io server disconnect") socket.connect(); // the server closed it: try again
  });
  let attempt = 0;
  socket.io.on("reconnect_attempt", n => { attempt = n; });
  socket.io.on("reconnect_error", () => session._emit("reconnecting", { reason: "unreachable", attempt }));
  socket.on("connect", async () => { // every connection after the first: a manager's
    // reconnect, or ours after the server closed the connection (a drain's hand-off)
    if (session._ended) return;
    try {
      const resumed = await ack(socket, "start_session", { resume_token: session.resumeToken, session_id: session.id, since_seq: session.lastSeq }, opts.timeoutMs);
      session._live = true;
      session._emit("resumed", { replayed: resumed.replayed || 0, lastSeq: resumed.last_seq });
      session._flush();
    } catch (err) {
      session._emit("error", err);
    }
  });
  return session;
}

export class Monitor extends Emitter {
  /** @internal use watch() */
  constructor(socket) {
    super();
    this.socket = socket;
    this.subscribed = new Set();
    this.sessions = []; // the live sessions as of the last (re)connect
  }

  /** One session's live results from now on; resolves to its most recent ones. */
  async subscribe(sessionId, { timeoutMs = 30_000 } = {}) {
    const reply = await ack(this.socket, "subscribe", { session_id: sessionId }, timeoutMs);
    this.subscribed.add(sessionId);
    return reply.recent;
  }

  unsubscribe(sessionId) {
    this.subscribed.delete(sessionId);
    this.socket.emit("unsubscribe", { session_id: sessionId });
  }

  close() {
    this.socket.io.reconnection(false);
    this.socket.disconnect();
  }
}

/**
 * A supervisor's view (a supervisor token, or a `subscribe` token for one session): `sessions`
 * (every live session, at connect and each reconnect), `session` (a session started, changed or
 * ended), `result` (of subscribed sessions), `alert`, `error`, `reconnecting`. Resolves once
 * connected and subscribed to the session list (with a `subscribe` token: connected only).
 */
export async function watch(options) {
  const opts = { timeoutMs: 30_000, all: true, ...options };
  if (!opts.url) throw new TypeError("watch() needs {url}");
  const socket = io(opts.url, {
    transports: ["websocket"],
    reconnectionDelay: 500,
    reconnectionDelayMax: 5000,
    auth: cb => {
      const token = typeof opts.token === "function" ? opts.token() : opts.token;
      Promise.resolve(token).then(t => cb({ token: t || null }), () => cb({ token: null }));
    },
    ...opts.socketOptions,
  });
  const monitor = new Monitor(socket);
  socket.on("session_update", u => monitor._emit("session", u));
  socket.on("emotion_result", r => { if (monitor.subscribed.has(r.session_id)) monitor._emit("result", r); });
  socket.on("utterance_result", u => { if (monitor.subscribed.has(u.session_id)) monitor._emit("utterance", u); });
  socket.on("alert", a => monitor._emit("alert", a));
  socket.on("error", e => monitor._emit("error", new VoxaffectError(e.code, e.message, e)));
  const list = async () => {
    if (!opts.all) return;
    const reply = await ack(socket, "subscribe", {}, opts.timeoutMs);
    monitor.sessions = reply.sessions;
    monitor._emit("sessions", reply.sessions);
  };
  await connected(socket, opts.timeoutMs);
  try {
    await list();
  } catch (err) {
    socket.disconnect();
    throw err;
  }
  let attempt = 0;
  socket.on("disconnect", reason => monitor._emit("reconnecting", { reason, attempt: 0 }));
  socket.io.on("reconnect_attempt", n => { attempt = n; });
  socket.io.on("reconnect_error", () => monitor._emit("reconnecting", { reason: "unreachable", attempt }));
  socket.io.on("reconnect", () => {
    monitor._emit("connected", {});
    list().catch(err => monitor._emit("error", err));
  });
  return monitor;
}
