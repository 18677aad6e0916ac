// Microphone capture for voxaffect-client (browsers): an AudioWorklet takes the device's audio
// at its own rate, averages it to mono, resamples it to 16 kHz (windowed sinc) and hands out
// PCM16 chunks of `chunkMs`, with each chunk's level in dBFS.
//
//   const mic = await startMic({ deviceId, onChunk: pcm => session.send(pcm) });
//   ...
//   mic.stop();
//
// A softphone that already has a MediaStream (a WebRTC call) passes it as `stream`.

export async function listMicrophones() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  return devices.filter(d => d.kind === "audioinput");
}

export async function startMic({ deviceId, stream, chunkMs = 100, onChunk, onLevel, workletUrl } = {}) {
  if (typeof onChunk !== "function") throw new TypeError("startMic() needs onChunk(pcm: Int16Array)");
  const owned = !stream;
  stream = stream || (await navigator.mediaDevices.getUserMedia({
    audio: {
      deviceId: deviceId ? { exact: deviceId } : undefined,
      echoCancellation: false,
      noiseSuppression: false,
      autoGainControl: false,
    },
  }));
  const ctx = new AudioContext();
  await ctx.resume();
  await ctx.audioWorklet.addModule(workletUrl || new URL("./worklet.js", import.meta.url).href);
  const source = ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(ctx, "pcm16-capture", { processorOptions: { chunkMs } });
  const mute = ctx.createGain();
  mute.gain.value = 0;
  source.connect(node).connect(mute).connect(ctx.destination); // pulled by the graph, never heard
  let inputRate = ctx.sampleRate;
  node.port.onmessage = e => {
    if (e.data.type === "format") { inputRate = e.data.inputRate; return; }
    if (onLevel) onLevel(e.data.levelDb);
    onChunk(e.data.pcm);
  };
  return {
    get inputRate() { return inputRate; },
    outputRate: 16000,
    stop() {
      node.port.onmessage = null;
      node.disconnect();
      if (owned) stream.getTracks().forEach(t => t.stop());
      return ctx.close();
    },
  };
}

export { startMic as start }; // import * as mic from "voxaffect-client/mic"; mic.start({ deviceId, onChunk })
