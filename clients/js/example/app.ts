// The README's quick starts, type-checked (npm run typecheck): a web app with the microphone,
// and a softphone that already has a MediaStream.
import { connect, type Result, type Summary } from "voxaffect-client";
import { startMic } from "voxaffect-client/mic";

export async function webApp(mintToken: (scope: string, sessionId: string | null) => Promise<string>) {
  const session = await connect({
    url: "https://voxaffect.example.com",
    token: ({ scope, sessionId }) => mintToken(scope, sessionId), // short-lived, from your backend
  });
  session.on("result", (r: Result) => console.log(r.emotion, r.stress.index, r.random_weights));
  session.on("reconnecting", () => console.log("reconnecting…"));
  const mic = await startMic({ onChunk: pcm => session.send(pcm) });
  return async (): Promise<Summary> => {
    await mic.stop();
    return session.end();
  };
}

export async function softphone(call: MediaStream, token: string) {
  const session = await connect({ url: "https://voxaffect.example.com", token });
  session.on("result", r => { if (r.stress.level === "high") console.warn("stress", r.stress.index); });
  const mic = await startMic({ stream: call, onChunk: pcm => session.send(pcm) });
  return { session, mic };
}

// A supervisor's dashboard: every live session, then one call's results.
export async function dashboard(token: string) {
  const { watch } = await import("voxaffect-client");
  const monitor = await watch({ url: "https://voxaffect.example.com", token });
  monitor.on("session", s => console.log(s.session_id, s.last?.stress.level));
  const first = monitor.sessions[0];
  if (first) {
    const recent = await monitor.subscribe(first.session_id);
    monitor.on("result", r => console.log(r.track, r.emotion, recent.length));
  }
  return monitor;
}

// The microphone module as a namespace, a chosen device.
export async function withDevice(deviceId: string, onChunk: (pcm: Int16Array) => void) {
  const mic = await import("voxaffect-client/mic");
  const devices = await mic.listMicrophones();
  return mic.start({ deviceId: deviceId || devices[0]?.deviceId, onChunk });
}
