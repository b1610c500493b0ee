// Types for densepush-client.

export declare const State: Readonly<{
  CONNECTING: "connecting";
  OPEN: "open";
  RECONNECTING: "reconnecting";
  STOPPED: "stopped";
  CLOSED: "closed";
}>;
export type State = (typeof State)[keyof typeof State];

/** A position in one stream: the last offset received in that epoch. */
export interface Position {
  epoch: string;
  offset: number;
}

/** Anything constructible like the browser's WebSocket (e.g. `WebSocket` from the `ws` package). */
export type WebSocketConstructor = new (url: string) => any;

export interface ConnectOptions {
  /** JWT sent as `?token=`; a function is called before every attempt (so a refreshed token is picked up). */
  token?: string | (() => string | Promise<string>);
  /** Ask for envelopes and send `since=` on reconnect to recover missed messages. Default true. */
  recover?: boolean;
  /** WebSocket implementation. Default `globalThis.WebSocket` (Node 20 has none: pass `ws`'s). */
  WebSocket?: WebSocketConstructor;
  /** Positions to start from, e.g. saved from a previous page load. */
  positions?: Record<string, Position>;
  /** First reconnect delay. Default 500 ms. */
  initialBackoffMs?: number;
  /** Longest reconnect delay. Default 30 000 ms. */
  maxBackoffMs?: number;
  /** Growth of the delay per failed attempt. Default 2. */
  backoffFactor?: number;
  /** Each delay is multiplied by a random factor in [1 - jitter, 1]. Default 0.5. */
  jitter?: number;
  /** After close 1001 (server going away), reconnect within a random delay up to this. Default 2 000 ms. */
  goingAwayMaxDelayMs?: number;
  /** A connection open this long resets the backoff. Default 5 000 ms. */
  stableAfterMs?: number;
  /**
   * Consecutive failures before the connection opens, with no visible HTTP status (browsers), that count as an
   * authentication failure. Default 8. With Node's `ws`, a 401/403 stops at once.
   */
  authFailureAfter?: number;
  /** Called when the client stops because of a (suspected) authentication failure. */
  onAuthFailure?: (info: AuthFailure) => void;
  /**
   * Drop and reconnect when nothing arrives for this long. Default 45 000 ms where pings are observable (Node
   * with `ws`), 0 (off) in browsers, which answer pings invisibly: set it there only if your backend publishes
   * a heartbeat more often than the timeout.
   */
  readTimeoutMs?: number;
  /**
   * When a resync names a new epoch of a stream the client knew (the server restarted or its history was
   * cleared), reconnect once with position 0 in that epoch so every message of the new epoch is replayed.
   * The `resync` event is emitted either way. Default true.
   */
  recoverNewEpoch?: boolean;
  /**
   * WebSocket attempts in a row that failed to open (with no HTTP status to read: something on the path blocks
   * upgrades) before the client switches to Server-Sent Events for good. Default 3; 0 turns the fallback off.
   * Only where an EventSource exists (browsers, or `EventSource` below).
   */
  sseFallbackAfter?: number;
  /** EventSource implementation. Default `globalThis.EventSource`. */
  EventSource?: new (url: string) => EventSource;
  /** The SSE URL. Default: the WebSocket URL with ws→http, wss→https and a final `/ws` → `/sse`. */
  sseUrl?: string;
}

export interface Message {
  kind: "message";
  /** Text payload, or the bytes of a binary one. */
  data: string | Uint8Array;
  binary: boolean;
  /** `user:{id}`, `channel:{name}` or `all` (absent when the connection does not recover). */
  stream?: string;
  /** The stream's epoch; `""` when the stream keeps no history. */
  epoch?: string;
  /** Offset in the stream; 0 when the stream keeps no history. */
  offset?: number;
}

export interface Resync {
  stream: string;
  epoch: string;
  offset: number;
}

export interface AuthFailure {
  /** 401 or 403 when visible, otherwise null. */
  status: number | null;
  attempts: number;
}

export interface EventMap {
  message: Message;
  state: { state: State; previous: State };
  /** The server could not replay what was missed in this stream: refetch the app's state. */
  resync: Resync;
  open: { transport?: "sse" };
  /** WebSocket never opened `sseFallbackAfter` times in a row: from now on the client uses EventSource. */
  fallback: { transport: "sse"; attempts: number };
  close: { code: number; reason: string; wasClean: boolean; opened: boolean };
  /** Closed by the backend (1000 or 3000-4999): the client stops until `setToken()` or `reconnect()`. */
  kicked: { code: number; reason: string };
  authfailure: AuthFailure;
}

export declare class DensepushClient {
  constructor(url: string, options?: ConnectOptions);
  readonly url: string;
  readonly state: State;
  /** `"websocket"`, or `"sse"` after the fallback. */
  readonly transport: "websocket" | "sse";
  on<K extends keyof EventMap>(type: K, listener: (event: EventMap[K]) => void): () => void;
  off<K extends keyof EventMap>(type: K, listener: (event: EventMap[K]) => void): void;
  setToken(token: string | (() => string | Promise<string>)): void;
  reconnect(): void;
  close(code?: number, reason?: string): void;
  getPositions(): Record<string, Position>;
}

export declare function connect(url: string, options?: ConnectOptions): DensepushClient;
export declare function decode(
  data: string | ArrayBuffer | Uint8Array,
  enveloped: boolean,
): Message | ({ kind: "resync" } & Resync);
export declare function encodeSince(positions: Map<string, Position>): string;
/** The SSE URL for a WebSocket URL (ws→http, wss→https, `/ws`→`/sse`). */
export declare function sseUrlFor(wsUrl: string): string;
/** The position an SSE event id (`STREAM@EPOCH:OFFSET`) names, or null. */
export declare function parseEventId(id: string): Position & { stream: string } | null;
