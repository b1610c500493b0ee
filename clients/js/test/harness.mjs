// Test harness: starts the real densepush binary (path in DP_TEST_BIN, set by tests/js_client.rs), restarts
// it on the same ports, talks to its admin API, mints tokens with `densepush token`, and puts a TCP proxy between
// client and server that a test can cut, freeze or close to new connections.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const BIN = process.env.DP_TEST_BIN;
if (!BIN) {
  throw new Error("DP_TEST_BIN is not set: run these tests through `cargo test --test js_client`");
}

// The server takes every DENSEPUSH_* variable as a config override: give it none of the developer's.
const SERVER_ENV = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("DENSEPUSH_")));

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Waits until `cond()` is truthy, polling; throws `what` after `timeoutMs`. */
export async function waitFor(cond, what, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await cond();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

export async function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

const SECRET = "js-client-test-secret-0123456789abcdef";

/** Fast keepalive by default (dead connections show within a second); a test may override any key. */
const WEBSOCKET_DEFAULTS = { ping_interval_ms: "500", pong_timeout_ms: "400", timer_tick_ms: "20" };

function websocketSection(lines) {
  const given = lines.split("\n").filter((line) => line.trim() !== "");
  const keys = new Set(given.map((line) => line.split("=")[0].trim()));
  const defaults = Object.entries(WEBSOCKET_DEFAULTS)
    .filter(([key]) => !keys.has(key))
    .map(([key, value]) => `${key} = ${value}`);
  return [...defaults, ...given].join("\n");
}

/** A densepush process with fixed ports (so it can be restarted in place) and history on. */
export class DensepushServer {
  static async create({ extra = "", apiKey = "", websocket = "", admin = "", server: serverLines = "" } = {}) {
    const dir = mkdtempSync(join(tmpdir(), "densepush-js-"));
    const server = new DensepushServer(dir, await freePort(), await freePort(), extra, apiKey, websocket, admin, serverLines);
    await server.start();
    return server;
  }

  constructor(dir, clientPort, adminPort, extra, apiKey, websocket, admin, serverLines = "") {
    this.dir = dir;
    this.apiKey = apiKey;
    this.clientPort = clientPort;
    this.adminPort = adminPort;
    this.config = join(dir, "config.toml");
    writeFileSync(
      this.config,
      `[server]
listen = "127.0.0.1:${clientPort}"
reactors = 2
shutdown_timeout_ms = 2000
${serverLines}

[websocket]
${websocketSection(websocket)}

[auth]
mode = "jwt"
jwt_secret = "${SECRET}"

[admin]
listen = "127.0.0.1:${adminPort}"
api_key = "${apiKey}"
${admin}

[log]
level = "warn"

[history]
user = true
channel = true
all = true
size = 1000
${extra}
`,
    );
    this.proc = null;
    this.log = "";
  }

  get url() {
    return `ws://127.0.0.1:${this.clientPort}/ws`;
  }

  get admin() {
    return `http://127.0.0.1:${this.adminPort}`;
  }

  async start() {
    const proc = spawn(BIN, ["--config", this.config], { stdio: ["ignore", "pipe", "pipe"], env: SERVER_ENV });
    this.proc = proc;
    proc.stderr.on("data", (chunk) => (this.log += chunk));
    let out = "";
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`server did not start:\n${this.log}`)), 10_000);
      proc.stdout.on("data", (chunk) => {
        out += chunk;
        if (out.includes("densepush listening")) {
          clearTimeout(timer);
          resolve();
        }
      });
      proc.once("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`server exited with ${code} at start:\n${this.log}`));
      });
    });
  }

  /** SIGTERM, then wait for the process to exit. */
  async stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null) return;
    const exited = new Promise((resolve) => proc.once("exit", resolve));
    proc.kill("SIGTERM");
    await exited;
  }

  async restart() {
    await this.stop();
    await this.start();
  }

  async dispose() {
    if (this.proc && this.proc.exitCode === null) {
      const exited = new Promise((resolve) => this.proc.once("exit", resolve));
      this.proc.kill("SIGKILL");
      await exited;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }

  token(user, channels = []) {
    const args = ["--config", this.config, "token", "--user", user, "--ttl", "3600"];
    if (channels.length) args.push("--channels", channels.join(","));
    return execFileSync(BIN, args, { encoding: "utf8", env: SERVER_ENV }).trim();
  }

  async request(method, path, body) {
    const headers = this.apiKey ? { Authorization: `Bearer ${this.apiKey}` } : {};
    const res = await fetch(this.admin + path, { method, body, headers });
    const text = await res.text();
    if (res.status >= 300) throw new Error(`${method} ${path}: ${res.status} ${text}`);
    return text ? JSON.parse(text) : null;
  }

  publish(path, body) {
    return this.request("POST", "/publish/" + path, body);
  }

  kick(user) {
    return this.request("DELETE", "/connections/user/" + encodeURIComponent(user));
  }

  async presence(user) {
    return (await this.request("GET", "/presence/user/" + encodeURIComponent(user))).connections;
  }
}

/**
 * A TCP proxy in front of the server. `cut()` kills every proxied connection (a network drop), `freeze()` stops
 * forwarding on them without closing (a dead path: only a read timeout notices), and `refuse` closes new
 * connections at once (the network is still down). With `refuseUpgrades` it plays a proxy that blocks
 * WebSocket: a request carrying `Upgrade: websocket` is answered 403 and closed, plain HTTP (SSE) goes through.
 * `requests` keeps the head of every request it forwarded.
 */
export class Proxy {
  static async create(targetPort) {
    const proxy = new Proxy(targetPort);
    await new Promise((resolve) => proxy.server.listen(0, "127.0.0.1", resolve));
    proxy.port = proxy.server.address().port;
    return proxy;
  }

  constructor(targetPort) {
    this.targetPort = targetPort;
    this.refuse = false;
    this.refuseUpgrades = false;
    this.requests = [];
    this.pairs = new Set();
    this.accepted = 0;
    this.server = net.createServer((client) => {
      if (this.refuse) {
        client.destroy();
        return;
      }
      if (this.refuseUpgrades) {
        client.once("data", (first) => {
          const head = first.toString("latin1");
          if (/^upgrade:\s*websocket/im.test(head)) {
            client.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return;
          }
          client.pause();
          this.#pipe(client, first);
          client.resume();
        });
        return;
      }
      this.#pipe(client, null);
    });
  }

  #pipe(client, first) {
    this.accepted += 1;
    if (first) this.requests.push(first.toString("latin1"));
    const upstream = net.connect(this.targetPort, "127.0.0.1");
    if (first) upstream.write(first);
    const pair = { client, upstream, frozen: false };
    this.pairs.add(pair);
    const forward = (from, to) =>
      from.on("data", (chunk) => {
        if (!pair.frozen) to.write(chunk);
      });
    forward(client, upstream);
    forward(upstream, client);
    const end = () => {
      if (pair.frozen) return;
      client.destroy();
      upstream.destroy();
      this.pairs.delete(pair);
    };
    client.on("close", end).on("error", end);
    upstream.on("close", end).on("error", end);
  }

  url(path = "/ws") {
    return `ws://127.0.0.1:${this.port}${path}`;
  }

  cut() {
    for (const pair of this.pairs) {
      pair.client.resetAndDestroy?.() ?? pair.client.destroy();
      pair.upstream.destroy();
    }
    this.pairs.clear();
  }

  freeze() {
    for (const pair of this.pairs) pair.frozen = true;
  }

  /** Stops reading from the server on every proxied connection (a client that does not keep up), or resumes. */
  stall(on) {
    for (const pair of this.pairs) {
      if (on) pair.upstream.pause();
      else pair.upstream.resume();
    }
  }

  close() {
    for (const pair of this.pairs) {
      pair.client.destroy();
      pair.upstream.destroy();
    }
    return new Promise((resolve) => this.server.close(resolve));
  }
}

/** Headless Chromium from the system (`/usr/bin/chromium`, or DP_TEST_CHROMIUM), with a fresh profile. */
export async function launchChromium() {
  const { chromium } = await import("playwright-core");
  const profile = mkdtempSync(join(tmpdir(), "densepush-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.DP_TEST_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1280, height: 860 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const close = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, close };
}

/** Records console errors and uncaught exceptions of a page. */
export function watchErrors(page) {
  const errors = [];
  page.on("console", (msg) => {
    if (msg.type() === "error") errors.push(msg.text());
  });
  page.on("pageerror", (e) => errors.push(String(e)));
  return errors;
}
