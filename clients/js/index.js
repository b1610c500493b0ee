// densepush-client: a small, dependency-free client for the densepush WebSocket push server.
//
// It owns one logical subscription that survives disconnections: it reconnects with jittered exponential
// backoff, honours the server's close reasons (a kick or an auth failure stops it until the app gives it a new
// token; 1001 "going away" reconnects soon), keeps the last position it saw in every stream and sends them back
// as `since=` so the server replays what was missed (or says `resync` when it cannot). It does not parse
// application payloads or keep application state: a `resync` means "refetch", and that is the app's job.
//
// Wire formats (see the server's README, "Missed-message recovery"):
//   text:   {"s":STREAM,"e":EPOCH,"o":OFFSET,"d":PAYLOAD}   (no e/o when the stream keeps no history)
//   binary: version(1) | u16 stream length | stream | u8 epoch length | epoch | u64 offset | payload
//   resync: {"type":"resync","s":STREAM,"e":EPOCH,"o":OFFSET}
//
// Works in browsers and in Node 20+ (which has no global WebSocket: pass `{ WebSocket }` from the `ws` package).
//
// Fallback: where WebSocket upgrades are blocked (some corporate proxies and antivirus products), the client
// switches to Server-Sent Events (`GET /sse`, an EventSource) after `sseFallbackAfter` WebSocket attempts in a
// row failed to open (3 by default where `EventSource` exists; 0 turns it off). The server sends each event's
// position as its id (`STREAM@EPOCH:OFFSET`), so the browser's own reconnect resumes with `Last-Event-ID`, and
// `event: close` after a kick stops the client as a WebSocket close code would.

/** Connection states, in the order a client usually goes through them. */
export const State = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  /** Waiting for the backoff delay before the next attempt. */
  RECONNECTING: "reconnecting",
  /** Kicked or refused (401/403): waits for `setToken()` or `reconnect()`. */
  STOPPED: "stopped",
  /** `close()` was called. */
  CLOSED: "closed",
});

const DEFAULTS = Object.freeze({
  recover: true,
  initialBackoffMs: 500,
  maxBackoffMs: 30_000,
  backoffFactor: 2,
  // Each delay is multiplied by a random factor in [1 - jitter, 1], so a crowd of clients spreads out.
  jitter: 0.5,
  // 1001 (server restarting): reconnect after a random delay in [0, goingAwayMaxDelayMs].
  goingAwayMaxDelayMs: 2_000,
  // A connection that stayed open this long resets the backoff.
  stableAfterMs: 5_000,
  // Consecutive failures before the connection opened, with no HTTP status to look at (browsers), that are
  // taken as an authentication failure. Where the status is visible (Node with `ws`), 401/403 stop at once.
  authFailureAfter: 8,
  // WebSocket attempts in a row that failed to open before switching to EventSource (where it exists).
  sseFallbackAfter: 3,
});

/**
 * The SSE URL for a WebSocket URL: same host, `ws:` → `http:`, `wss:` → `https:`, and a path ending in `/ws`
 * ending in `/sse` instead (the server's defaults), query kept.
 * @param {string} wsUrl
 */
export function sseUrlFor(wsUrl) {
  const url = new URL(wsUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : "http:";
  url.pathname = url.pathname.replace(/\/ws$/, "/sse");
  return url.toString();
}

/**
 * The position an SSE event id names (`STREAM@EPOCH:OFFSET`, the stream percent-encoded where it holds `%` or
 * `,`), or null.
 * @param {string} id
 */
export function parseEventId(id) {
  const colon = id.lastIndexOf(":");
  const at = id.lastIndexOf("@", colon);
  if (colon < 0 || at < 0) return null;
  const offset = Number(id.slice(colon + 1));
  if (!Number.isSafeInteger(offset)) return null;
  try {
    return { stream: decodeURIComponent(id.slice(0, at)), epoch: id.slice(at + 1, colon), offset };
  } catch {
    return null;
  }
}

function base64Bytes(text) {
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

const textDecoder = new TextDecoder();

/**
 * Decodes one message from the server: an envelope, a resync notice, or (for connections without recovery)
 * the bare payload.
 * @param {string | ArrayBuffer | Uint8Array} data
 * @param {boolean} enveloped whether the connection asked for envelopes
 */
export function decode(data, enveloped) {
  if (typeof data === "string") {
    if (!enveloped) return { kind: "message", data, binary: false };
    let value;
    try {
      value = JSON.parse(data);
    } catch {
      return { kind: "message", data, binary: false };
    }
    if (value && value.type === "resync") {
      return { kind: "resync", stream: value.s, epoch: value.e, offset: value.o };
    }
    if (value && typeof value.s === "string" && "d" in value) {
      return {
        kind: "message",
        data: value.d,
        binary: false,
        stream: value.s,
        epoch: value.e ?? "",
        offset: value.o ?? 0,
      };
    }
    return { kind: "message", data, binary: false };
  }
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  if (!enveloped || bytes.length < 12 || bytes[0] !== 1) {
    return { kind: "message", data: bytes, binary: true };
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const streamLen = view.getUint16(1);
  let at = 3;
  const stream = textDecoder.decode(bytes.subarray(at, at + streamLen));
  at += streamLen;
  const epochLen = bytes[at];
  at += 1;
  const epoch = textDecoder.decode(bytes.subarray(at, at + epochLen));
  at += epochLen;
  if (at + 8 > bytes.length) return { kind: "message", data: bytes, binary: true };
  const offset = Number(view.getBigUint64(at));
  at += 8;
  return { kind: "message", data: bytes.subarray(at), binary: true, stream, epoch, offset };
}

/**
 * The `since` query value for these positions: `STREAM@EPOCH:OFFSET` items, each percent-encoded, joined by
 * raw commas (the server splits on raw commas before decoding).
 * @param {Map<string, {epoch: string, offset: number}>} positions
 */
export function encodeSince(positions) {
  const items = [];
  for (const [stream, { epoch, offset }] of positions) {
    if (epoch) items.push(encodeURIComponent(`${stream}@${epoch}:${offset}`));
  }
  return items.join(",");
}

/**
 * Opens a client. It connects at once and keeps reconnecting until `close()`.
 * @param {string} url `ws://host:port/ws` (extra query parameters are kept)
 * @param {import("./index.js").ConnectOptions} [options]
 */
export function connect(url, options = {}) {
  return new DensepushClient(url, options);
}

export class DensepushClient {
  constructor(url, options = {}) {
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new TypeError("no WebSocket implementation: pass { WebSocket } (e.g. from the `ws` package)");
    }
    this.EventSource = options.EventSource ?? globalThis.EventSource;
    this.sseUrl = options.sseUrl ?? sseUrlFor(url);
    /** "websocket", or "sse" once the client fell back to EventSource. */
    this.transport = "websocket";
    this.token = options.token;
    /** @type {Map<string, {epoch: string, offset: number}>} */
    this.positions = new Map(Object.entries(options.positions ?? {}));
    this.state = State.CONNECTING;
    this.socket = null;
    this.listeners = new Map();
    this.attempts = 0;
    this.failuresBeforeOpen = 0;
    this.timer = null;
    this.readTimer = null;
    this.openedAt = 0;
    queueMicrotask(() => this.#open());
  }

  /** Subscribes to `message`, `state`, `resync`, `open`, `close`, `kicked` or `authfailure`; returns an unsubscribe. */
  on(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this.listeners.get(type)?.delete(listener);
  }

  /** Gives the client a new token; a client stopped by a kick or an auth failure reconnects with it. */
  setToken(token) {
    this.token = token;
    if (this.state === State.STOPPED) this.reconnect();
  }

  /** Reconnects now (also from `stopped`); a no-op after `close()`. */
  reconnect() {
    if (this.state === State.CLOSED) return;
    clearTimeout(this.timer);
    this.failuresBeforeOpen = 0;
    this.attempts = 0;
    if (this.socket) {
      this.#drop(this.socket);
      this.socket = null;
    }
    this.#open();
  }

  /** Closes for good. */
  close(code = 1000, reason = "") {
    clearTimeout(this.timer);
    this.#clearReadTimer();
    this.#setState(State.CLOSED);
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      try {
        socket.close(code, reason);
      } catch {
        socket.close();
      }
    }
  }

  /** The last position seen in each stream, as a plain object. */
  getPositions() {
    return Object.fromEntries(this.positions);
  }

  #emit(type, event) {
    for (const listener of this.listeners.get(type) ?? []) {
      try {
        listener(event);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  #setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this.#emit("state", { state, previous });
  }

  #buildUrl(token) {
    const url = new URL(this.transport === "sse" ? this.sseUrl : this.url);
    if (token) url.searchParams.set("token", token);
    if (this.options.recover) url.searchParams.set("recover", "1");
    let href = url.toString();
    const since = this.options.recover ? encodeSince(this.positions) : "";
    if (since) href += (url.search ? "&" : "?") + "since=" + since;
    return href;
  }

  async #open() {
    if (this.state === State.CLOSED) return;
    this.#setState(State.CONNECTING);
    let token = this.token;
    if (typeof token === "function") {
      try {
        token = await token();
      } catch (e) {
        this.#emit("authfailure", { reason: "token callback failed", error: e });
        this.#stop();
        return;
      }
    }
    if (this.state !== State.CONNECTING) return;
    if (this.transport === "sse") {
      this.#openSse(token);
      return;
    }
    let socket;
    try {
      socket = new this.WebSocket(this.#buildUrl(token));
    } catch (e) {
      this.#scheduleReconnect(e);
      return;
    }
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    let opened = false;
    let status = 0;
    socket.onopen = () => {
      if (this.socket !== socket) return;
      opened = true;
      this.openedAt = Date.now();
      this.failuresBeforeOpen = 0;
      this.#setState(State.OPEN);
      this.#armReadTimer();
      this.#emit("open", {});
    };
    socket.onmessage = (event) => {
      if (this.socket !== socket) return;
      this.#armReadTimer();
      this.#onData(event.data);
    };
    socket.onerror = (event) => {
      // `ws` reports a refused handshake as "Unexpected server response: 401"; browsers say nothing.
      const match = /Unexpected server response: (\d{3})/.exec(String(event?.message ?? event?.error?.message ?? ""));
      if (match) status = Number(match[1]);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.#clearReadTimer();
      this.#onClose(event, opened, status);
    };
    // Node's `ws` shows server pings (and answers them itself): they prove the connection is alive.
    if (typeof socket.on === "function") socket.on("ping", () => this.socket === socket && this.#armReadTimer());
  }

  /** The stream as an EventSource: events carry their position as id; the browser reconnects by itself. */
  #openSse(token) {
    let source;
    try {
      source = new this.EventSource(this.#buildUrl(token));
    } catch (e) {
      this.#scheduleReconnect(e);
      return;
    }
    this.socket = source;
    let opened = false;
    const mine = () => this.socket === source;
    const positioned = (event, decoded) => {
      const at = event.lastEventId ? parseEventId(event.lastEventId) : null;
      return at ? { ...decoded, ...at } : decoded;
    };
    source.onopen = () => {
      if (!mine()) return;
      opened = true;
      this.openedAt = Date.now();
      this.failuresBeforeOpen = 0;
      this.#setState(State.OPEN);
      this.#emit("open", { transport: "sse" });
    };
    source.onmessage = (event) => {
      if (mine()) this.#onDecoded(positioned(event, { kind: "message", data: event.data, binary: false }));
    };
    source.addEventListener("binary", (event) => {
      if (mine()) {
        this.#onDecoded(positioned(event, { kind: "message", data: base64Bytes(event.data), binary: true }));
      }
    });
    source.addEventListener("resync", (event) => {
      if (mine()) this.#onData(event.data, true);
    });
    source.addEventListener("close", (event) => {
      if (!mine()) return;
      // The server ended the stream on purpose (a kick): EventSource would reconnect by itself, so stop it.
      let info = {};
      try {
        info = JSON.parse(event.data);
      } catch {
        // keep the defaults
      }
      this.socket = null;
      this.#drop(source);
      this.#onClose({ code: info.code ?? 1000, reason: info.reason ?? "", wasClean: true }, true, 0);
    });
    source.onerror = () => {
      if (!mine()) return;
      if (source.readyState === 0 && opened) {
        // The stream ended (a drain, a cut): the browser reconnects after `retry`, sending Last-Event-ID.
        opened = false;
        this.#emit("close", { code: 1006, reason: "", wasClean: false, opened: true });
        this.#setState(State.RECONNECTING);
        return;
      }
      if (source.readyState === 0) return; // still retrying on its own
      // Closed for good by the browser (a refusal: any status but 200): back off and try again ourselves.
      this.socket = null;
      this.#drop(source);
      this.#onClose({ code: 1006, reason: "", wasClean: false }, opened, 0);
    };
  }

  #onData(raw, enveloped = this.options.recover) {
    this.#onDecoded(decode(raw, enveloped));
  }

  #onDecoded(decoded) {
    if (decoded.kind === "resync") {
      const known = this.positions.get(decoded.stream);
      const newEpoch = Boolean(decoded.epoch && known && known.epoch !== decoded.epoch && decoded.offset > 0);
      // Tell the app first: what happened between its position and the resync is unknown, so it refetches.
      this.#emit("resync", { stream: decoded.stream, epoch: decoded.epoch, offset: decoded.offset });
      if (newEpoch && this.options.recoverNewEpoch !== false) {
        // The stream started a new epoch (server restarted, history cleared): everything in it is new to us, so
        // ask for it from its start. The server only reads positions at the upgrade, hence a reconnect; what
        // this socket would still deliver is replayed there, in order.
        this.positions.set(decoded.stream, { epoch: decoded.epoch, offset: 0 });
        const socket = this.socket;
        this.socket = null;
        this.#clearReadTimer();
        if (socket) this.#drop(socket);
        this.#open();
        return;
      }
      this.positions.set(decoded.stream, { epoch: decoded.epoch, offset: decoded.offset });
      return;
    }
    if (decoded.stream !== undefined && decoded.epoch) {
      const known = this.positions.get(decoded.stream);
      // A replay never repeats what was delivered, but a duplicate would be harmless to drop anyway.
      if (known && known.epoch === decoded.epoch && decoded.offset <= known.offset) return;
      this.positions.set(decoded.stream, { epoch: decoded.epoch, offset: decoded.offset });
    }
    this.#emit("message", decoded);
  }

  #onClose(event, opened, status) {
    const code = event?.code ?? 1006;
    const reason = event?.reason ?? "";
    this.#emit("close", { code, reason, wasClean: Boolean(event?.wasClean), opened });
    if (this.state === State.CLOSED) return;
    if (opened && Date.now() - this.openedAt >= this.options.stableAfterMs) this.attempts = 0;
    // Kicked by the backend (DELETE /connections/...): 1000 or 3000-4999. Do not come back uninvited.
    if (opened && (code === 1000 || (code >= 3000 && code <= 4999))) {
      this.#emit("kicked", { code, reason });
      this.#stop();
      return;
    }
    if (!opened) {
      this.failuresBeforeOpen += 1;
      const fallback = this.options.sseFallbackAfter;
      if (
        this.transport === "websocket" &&
        fallback > 0 &&
        typeof this.EventSource === "function" &&
        !status &&
        this.failuresBeforeOpen >= fallback
      ) {
        // WebSocket never opened N times in a row, with no refusal to read: something on the path blocks
        // upgrades. Plain HTTP may get through.
        this.transport = "sse";
        this.failuresBeforeOpen = 0;
        this.attempts = 0;
        this.#emit("fallback", { transport: "sse", attempts: fallback });
        this.#open();
        return;
      }
      const refused = status === 401 || status === 403;
      const suspected = !status && this.failuresBeforeOpen >= this.options.authFailureAfter;
      if (refused || suspected) {
        const info = { status: status || null, attempts: this.failuresBeforeOpen };
        this.#emit("authfailure", info);
        this.options.onAuthFailure?.(info);
        this.#stop();
        return;
      }
    }
    if (code === 1001) {
      // The server is going away (restart or deploy): come back soon, but not all at the same moment.
      this.#setState(State.RECONNECTING);
      this.timer = setTimeout(() => this.#open(), Math.random() * this.options.goingAwayMaxDelayMs);
      return;
    }
    // 1008 (slow consumer), 1006 (network), 1011, a server that is down, ...: back off and recover.
    this.#scheduleReconnect();
  }

  #scheduleReconnect() {
    if (this.state === State.CLOSED) return;
    const { initialBackoffMs, maxBackoffMs, backoffFactor, jitter } = this.options;
    const base = Math.min(maxBackoffMs, initialBackoffMs * backoffFactor ** this.attempts);
    this.attempts += 1;
    const delay = base * (1 - jitter * Math.random());
    this.#setState(State.RECONNECTING);
    this.timer = setTimeout(() => this.#open(), delay);
  }

  #stop() {
    clearTimeout(this.timer);
    this.#setState(State.STOPPED);
  }

  #armReadTimer() {
    const ms = this.#readTimeoutMs();
    if (!ms) return;
    clearTimeout(this.readTimer);
    const socket = this.socket;
    this.readTimer = setTimeout(() => {
      if (this.socket !== socket || !socket) return;
      // Dead connection: nothing (not even a ping) within the timeout. Drop it and reconnect.
      this.socket = null;
      this.#drop(socket);
      this.#onClose({ code: 1006, reason: "read timeout", wasClean: false }, true, 0);
    }, ms);
  }

  #clearReadTimer() {
    clearTimeout(this.readTimer);
    this.readTimer = null;
  }

  #readTimeoutMs() {
    if (this.options.readTimeoutMs !== undefined) return this.options.readTimeoutMs;
    // Where pings are observable, a server that pings every 30 s (the default) is dead after 45 s of silence.
    return typeof this.socket?.on === "function" ? 45_000 : 0;
  }

  #drop(socket) {
    socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
    try {
      if (typeof socket.terminate === "function") socket.terminate();
      else socket.close();
    } catch {
      // already closed
    }
  }
}
