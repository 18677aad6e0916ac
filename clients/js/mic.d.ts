export interface Mic {
  readonly inputRate: number; // the device's rate
  readonly outputRate: 16000;
  stop(): Promise<void>;
}

export interface MicOptions {
  deviceId?: string;
  stream?: MediaStream; // a softphone's own stream (a WebRTC call), instead of getUserMedia
  chunkMs?: number;
  onChunk: (pcm: Int16Array) => void;
  onLevel?: (dbfs: number) => void;
  workletUrl?: string;
}

export declare function startMic(options: MicOptions): Promise<Mic>;
export declare function listMicrophones(): Promise<MediaDeviceInfo[]>;
export declare const start: typeof startMic;
