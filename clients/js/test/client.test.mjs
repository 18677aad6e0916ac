// voxaffect-client against a real server (started by tests/protocol/test_js_client.py):
// VOXAFFECT_URL, VOXAFFECT_TOKEN (a supervisor token) and VOXAFFECT_PCM (16 kHz PCM16 speech).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { connect, VoxaffectError } from "voxaffect-client";

const URL = process.env.VOXAFFECT_URL;
const TOKEN = process.env.VOXAFFECT_TOKEN;
const PCM = readFileSync(process.env.VOXAFFECT_PCM);
const CHUNK = 3200; // 100 ms
const sleep = ms => new Promise(r => setTimeout(r, ms));

async function stream(session, { every = 25, during } = {}) {
  for (let i = 0, n = 0; i < PCM.length; i += CHUNK, n++) {
    const chunk = PCM.subarray(i, i + CHUNK);
    session.send(new Int16Array(chunk.buffer, chunk.byteOffset, chunk.byteLength / 2));
    if (during) await during(n);
    await sleep(every); // 4x real time
  }
}

function collect(session) {
  const results = [];
  session.on("result", r => results.push(r));
  return results;
}

const windows = results => results.map(r => [r.start_s, r.end_s]);
let reference;

test("a session streams, gets each result once in order, and ends with its summary", async () => {
  const session = await connect({ url: URL, token: TOKEN });
  const results = collect(session);
  const said = [];
  session.on("utterance", u => said.push(u));
  await stream(session);
  const summary = await session.end();
  assert.ok(results.length > 3);
  assert.ok(said.length >= 1); // each utterance, whole, before the summary
  assert.deepEqual(said.map(u => u.utterance_seq), said.map((_, i) => i));
  assert.equal(summary.utterances.count, said.length);
  assert.deepEqual(results.map(r => r.seq), results.map((_, i) => i + 1));
  assert.equal(summary.results, results.length);
  assert.equal(summary.session_id, session.id);
  assert.equal(results[0].random_weights, true); // a test model: not emotions
  reference = windows(results);
});

test("a dropped connection resumes: nothing lost, nothing twice, audio buffered meanwhile", async () => {
  const session = await connect({ url: URL, token: TOKEN });
  const results = collect(session);
  const events = [];
  session.on("reconnecting", () => events.push("reconnecting"));
  session.on("resumed", e => events.push(`resumed ${e.replayed >= 0}`));
  await stream(session, {
    during: async n => {
      if (n === 40) session.socket.io.engine.close(); // the network drops, mid-stream
    },
  });
  const summary = await session.end();
  assert.deepEqual(events, ["reconnecting", "resumed true"]);
  assert.deepEqual(results.map(r => r.seq), results.map((_, i) => i + 1));
  assert.equal(summary.results, results.length);
  assert.deepEqual(windows(results), reference); // the same windows as the unbroken stream
});

test("short-lived tokens are minted per connection: start first, then resume", async () => {
  const scopes = [];
  const mint = async ({ scope, sessionId }) => {
    scopes.push(scope);
    const res = await fetch(`${URL}/api/tokens`, {
      method: "POST",
      headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json" },
      body: JSON.stringify({ scope, session_id: sessionId || undefined, ttl_s: 60 }),
    });
    assert.equal(res.status, 200);
    return (await res.json()).token;
  };
  const session = await connect({ url: URL, token: mint });
  const results = collect(session);
  await stream(session, { during: async n => { if (n === 20) session.socket.io.engine.close(); } });
  const summary = await session.end();
  assert.deepEqual(scopes, ["start", "resume"]);
  assert.equal(summary.results, results.length);
  assert.deepEqual(windows(results), reference);
});

test("a bad token is refused, and a full reconnect buffer refuses audio with BUFFER_FULL", async () => {
  await assert.rejects(connect({ url: URL, token: "not-a-token-at-all" }), err => {
    assert.ok(err instanceof VoxaffectError);
    assert.equal(err.code, "UNAUTHORIZED");
    return true;
  });
  const session = await connect({ url: URL, token: TOKEN, maxBufferedBytes: 2 * CHUNK });
  const errors = [];
  session.on("error", e => errors.push(e.code));
  session.socket.io.engine.close();
  await sleep(10);
  const chunk = new Int16Array(CHUNK / 2);
  assert.deepEqual([session.send(chunk), session.send(chunk), session.send(chunk)], [true, true, false]);
  assert.deepEqual(errors, ["BUFFER_FULL"]);
  await new Promise(resolve => session.on("resumed", resolve));
  const summary = await session.end();
  assert.equal(summary.session_id, session.id);
});

test("a supervisor watches: the live list, then one session's results; a subscribe token sees one", async () => {
  const { watch } = await import("voxaffect-client");
  const session = await connect({ url: URL, token: TOKEN });
  const monitor = await watch({ url: URL, token: TOKEN });
  assert.ok(monitor.sessions.some(s => s.session_id === session.id));
  const results = [], said = [];
  monitor.on("result", r => results.push(r));
  monitor.on("utterance", u => said.push(u));
  await monitor.subscribe(session.id);
  const res = await fetch(`${URL}/api/tokens`, {
    method: "POST",
    headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json" },
    body: JSON.stringify({ scope: "subscribe", session_id: session.id }),
  });
  const one = await watch({ url: URL, token: (await res.json()).token, all: false });
  const seenByOne = [];
  one.on("result", r => seenByOne.push(r));
  await one.subscribe(session.id);
  await assert.rejects(one.subscribe("another-session"), err => err.code === "UNAUTHORIZED");
  await stream(session);
  const summary = await session.end();
  await sleep(500);
  assert.equal(results.length, summary.results);
  assert.equal(said.length, summary.utterances.count);
  assert.deepEqual(seenByOne.map(r => r.seq), results.map(r => r.seq));
  monitor.close();
  one.close();
});
