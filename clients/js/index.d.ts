// Types of voxaffect-client, from the server's protocol (README, Protocol).

export type Emotion = string; // one of the model's labels (emotion2vec_plus_large: 9)

export interface Stress {
  index: number; // 0-100
  raw_index: number;
  level: "low" | "moderate" | "elevated" | "high";
  confidence: number; // 0-1
  calibrating: boolean;
  components: Record<string, number>;
}

/** Valence and arousal projected from the scores (README: Derived valence and arousal); not a dimensional model. */
export interface Circumplex {
  valence: number | null; // -1..1
  arousal: number | null; // -1..1
  mapped: number; // share of probability on labels with a place on the circle
  derived_from: "emotion scores";
}

/** What a window's result and an utterance's share. */
export interface Classified {
  session_id: string;
  start_s: number;
  end_s: number;
  emotion: Emotion;
  confidence: number;
  scores: Record<Emotion, number>;
  circumplex: Circumplex;
  stress: Stress;
  device: string;
  random_weights?: boolean; // true: NOT emotions, a random-weight test model
  track?: string;
}

export interface Result extends Classified {
  seq: number; // rises by one per session
  speech_ratio: number;
  latency_ms: number;
  hop_s: number | null;
  expired: number; // windows of this track dropped unanalysed since the previous result
  narrowband?: boolean;
  fallback_reason?: string;
  embedding?: number[];
}

/** One utterance (speech between pauses), classified once as a whole clip; in order per track.
 * Its stress is over the whole utterance, against the same speaker baseline as the windows. */
export interface Utterance extends Classified {
  utterance_seq: number; // counts a track's utterances from 0
  speech_s: number;
  voiced_s: number;
  split: boolean; // cut at max_utterance_s: the speaker had not paused
}

export interface Vad {
  session_id: string;
  speech: boolean;
  at_s: number;
  track?: string;
}

export interface Alert {
  rule: string;
  severity: string;
  state: string;
  session_id: string;
  [field: string]: unknown;
}

export interface Summary {
  session_id: string;
  reason: string;
  results: number;
  duration_s?: number;
  speech_s?: number;
  emotion_mix?: Record<Emotion, number>;
  dominant_emotion?: Emotion | null;
  stress?: { mean: number | null; max: number | null; peaks: unknown[] };
  expired?: number;
  failed?: number;
  random_weights: boolean;
  dynamics?: Record<string, unknown>;
  utterances?: {
    count: number;
    by_emotion: Record<Emotion, number>;
    emotion_mix: Record<Emotion, number>;
    dominant_emotion: Emotion | null;
    stress: { mean: number | null; max: number | null; peaks: unknown[] };
    dropped: Record<"late" | "backlog" | "ended" | "failed", number>;
  };
  tracks?: Record<string, Record<string, unknown>>;
}

export declare class VoxaffectError extends Error {
  code: string; // the server's error code (UNAUTHORIZED, DRAINING, ...) or BUFFER_FULL, TIMEOUT
  details: Record<string, unknown>;
}

export type TokenSource =
  | string
  | ((request: { scope: "start" | "resume"; sessionId: string | null }) => string | Promise<string>);

export interface ConnectOptions {
  url: string;
  token?: TokenSource;
  sampleRate?: number; // of the audio you send (8000-48000); default 16000
  encoding?: "pcm_s16le" | "pcm_f32le" | "mulaw" | "alaw";
  channels?: number;
  sessionId?: string;
  resumeToken?: string; // resume a session instead of starting one
  sinceSeq?: number;
  options?: { embeddings?: boolean; utterances?: boolean };
  maxBufferedBytes?: number; // audio kept while reconnecting; default 1 MiB
  timeoutMs?: number;
  reconnectionDelayMax?: number;
  socketOptions?: Record<string, unknown>; // passed to socket.io-client's io()
}

export interface SessionEvents {
  result: Result;
  utterance: Utterance; // not replayed on resume: the stored session has every one
  vad: Vad;
  alert: Alert;
  summary: Summary;
  error: VoxaffectError;
  reconnecting: { reason: string; attempt: number }; // attempt > 0: the server is unreachable
  resumed: { replayed: number; lastSeq: number };
}

export declare class Session {
  readonly id: string;
  readonly resumeToken: string;
  readonly lastSeq: number;
  readonly config: Record<string, unknown>;
  on<E extends keyof SessionEvents>(event: E, listener: (payload: SessionEvents[E]) => void): this;
  off<E extends keyof SessionEvents>(event: E, listener: (payload: SessionEvents[E]) => void): this;
  send(audio: Int16Array | Float32Array | ArrayBuffer): boolean;
  end(options?: { timeoutMs?: number }): Promise<Summary>;
  close(): void;
}

export declare function connect(options: ConnectOptions): Promise<Session>;

export interface SessionState {
  event?: "started" | "result" | "paused" | "ended" | "handed_off" | "disconnected" | string;
  session_id: string;
  source: string;
  started_at: number;
  audio_s: number;
  connected: boolean;
  meta?: Record<string, unknown>;
  last?: Result | null;
  dynamics?: Record<string, unknown> | null; // the call's so far, as of a party's last pause
  [field: string]: unknown;
}

export interface MonitorEvents {
  sessions: SessionState[];
  session: SessionState;
  result: Result;
  utterance: Utterance; // of subscribed sessions
  alert: Alert;
  error: VoxaffectError;
  reconnecting: { reason: string; attempt: number };
  connected: Record<string, never>;
}

export interface WatchOptions {
  url: string;
  token?: string | (() => string | Promise<string>);
  all?: boolean; // subscribe to the list of every live session (a supervisor token); default true
  timeoutMs?: number;
  socketOptions?: Record<string, unknown>;
}

export declare class Monitor {
  readonly subscribed: Set<string>;
  readonly sessions: SessionState[]; // as of the last (re)connect
  on<E extends keyof MonitorEvents>(event: E, listener: (payload: MonitorEvents[E]) => void): this;
  off<E extends keyof MonitorEvents>(event: E, listener: (payload: MonitorEvents[E]) => void): this;
  subscribe(sessionId: string, options?: { timeoutMs?: number }): Promise<Result[]>;
  unsubscribe(sessionId: string): void;
  close(): void;
}

export declare function watch(options: WatchOptions): Promise<Monitor>;
