// AudioWorklet: microphone frames -> mono -> 16 kHz -> PCM16 chunks of ~100 ms.
//
// The context runs at the device's rate (often 44.1 or 48 kHz, stereo). Each 128-frame block is
// averaged to mono and resampled with a windowed-sinc (Blackman) low-pass interpolator whose
// cutoff sits just under the target Nyquist, so nothing above 8 kHz folds back into speech.
// Every `chunkSamples` output samples are posted as an Int16Array, with the chunk's RMS level
// in dBFS for the meter.

const TARGET_RATE = 16000;

class SincResampler {
  constructor(inRate, outRate, zeroCrossings = 8) {
    this.step = inRate / outRate;                     // input samples per output sample
    this.cutoff = Math.min(1, outRate / inRate) * 0.92; // of the input Nyquist
    this.half = Math.ceil(zeroCrossings / this.cutoff);
    this.buffer = new Float32Array(0);
    this.t = this.half;                               // next output time, in buffer samples
  }

  kernel(d) {
    if (Math.abs(d) >= this.half) return 0;
    const x = Math.PI * this.cutoff * d;
    const sinc = d === 0 ? 1 : Math.sin(x) / x;
    const w = 0.42 + 0.5 * Math.cos(Math.PI * d / this.half) + 0.08 * Math.cos(2 * Math.PI * d / this.half);
    return this.cutoff * sinc * w;
  }

  push(input) {
    const joined = new Float32Array(this.buffer.length + input.length);
    joined.set(this.buffer);
    joined.set(input, this.buffer.length);
    const out = [];
    while (this.t + this.half < joined.length) {
      const center = Math.floor(this.t);
      let acc = 0;
      for (let k = center - this.half + 1; k <= center + this.half; k++) {
        acc += joined[k] * this.kernel(this.t - k);
      }
      out.push(acc);
      this.t += this.step;
    }
    const keepFrom = Math.max(0, Math.floor(this.t) - this.half);
    this.buffer = joined.slice(keepFrom);
    this.t -= keepFrom;
    return out;
  }
}

class Pcm16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.chunkSamples = Math.round(TARGET_RATE * (opts.chunkMs || 100) / 1000);
    this.resampler = sampleRate === TARGET_RATE ? null : new SincResampler(sampleRate, TARGET_RATE);
    this.chunk = new Int16Array(this.chunkSamples);
    this.filled = 0;
    this.energy = 0;
    this.port.postMessage({ type: "format", inputRate: sampleRate, outputRate: TARGET_RATE });
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const n = channels[0].length;
    const mono = new Float32Array(n);
    for (const ch of channels) for (let i = 0; i < n; i++) mono[i] += ch[i] / channels.length;
    const samples = this.resampler ? this.resampler.push(mono) : mono;
    for (const s of samples) {
      const v = Math.max(-1, Math.min(1, s));
      this.energy += v * v;
      this.chunk[this.filled++] = v < 0 ? v * 32768 : v * 32767;
      if (this.filled === this.chunkSamples) {
        const rms = Math.sqrt(this.energy / this.chunkSamples);
        const pcm = this.chunk;
        this.port.postMessage({ type: "chunk", pcm, levelDb: 20 * Math.log10(Math.max(rms, 1e-6)) }, [pcm.buffer]);
        this.chunk = new Int16Array(this.chunkSamples);
        this.filled = 0;
        this.energy = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
