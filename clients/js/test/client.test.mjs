// The client in Node 20 with `ws`, against the real server: kick, restart, network drop and a dead path all end
// in a reconnect that recovers every message published meanwhile, in order.

import test, { after, before } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { connect, decode, encodeSince, State } from "../index.js";
import { DensepushServer, Proxy, sleep, waitFor } from "./harness.mjs";

const FAST = { WebSocket, initialBackoffMs: 50, maxBackoffMs: 400, goingAwayMaxDelayMs: 100, readTimeoutMs: 1500 };

let server;
let proxy;
const clients = [];

before(async () => {
  server = await DensepushServer.create();
  proxy = await Proxy.create(server.clientPort);
});

after(async () => {
  for (const c of clients) c.close();
  await proxy?.close();
  await server?.dispose();
});

function open(user, options = {}) {
  const client = connect(options.url ?? proxy.url(), {
    ...FAST,
    token: server.token(user, ["news"]),
    ...options,
  });
  clients.push(client);
  const got = [];
  const resyncs = [];
  client.on("message", (m) => got.push(m));
  client.on("resync", (r) => resyncs.push(r));
  return { client, got, resyncs };
}

const dataOf = (got, stream) => got.filter((m) => m.stream === stream).map((m) => m.data);

/** Connects `user`, checks one message per stream arrives, and returns the handle. */
async function connected(user, options) {
  const handle = open(user, options);
  await waitFor(() => handle.client.state === State.OPEN, "open");
  await server.publish(`user/${user}`, "m1");
  await server.publish("channel/news", `${user}-n1`);
  await waitFor(() => handle.got.length === 2, "first messages");
  return handle;
}

async function assertRecovered(handle, user) {
  await waitFor(
    () => dataOf(handle.got, `user:${user}`).length === 4 && dataOf(handle.got, "channel:news").includes(`${user}-n2`),
    "recovered messages",
  );
  assert.deepEqual(dataOf(handle.got, `user:${user}`), ["m1", "m2", "m3", "m4"]);
  const news = dataOf(handle.got, "channel:news").filter((d) => d.startsWith(`${user}-`));
  assert.deepEqual(news, [`${user}-n1`, `${user}-n2`]);
}

async function publishWhileAway(user) {
  for (const m of ["m2", "m3", "m4"]) await server.publish(`user/${user}`, m);
  await server.publish("channel/news", `${user}-n2`);
}

test("decode reads text and binary envelopes and resync notices", () => {
  const m = decode('{"s":"user:1","e":"E1","o":7,"d":"hi"}', true);
  assert.deepEqual(m, { kind: "message", data: "hi", binary: false, stream: "user:1", epoch: "E1", offset: 7 });
  const r = decode('{"type":"resync","s":"all","e":"E2","o":3}', true);
  assert.deepEqual(r, { kind: "resync", stream: "all", epoch: "E2", offset: 3 });
  const bin = new Uint8Array([1, 0, 3, 97, 108, 108, 2, 69, 80, 0, 0, 0, 0, 0, 0, 1, 2, 0xff, 0]);
  const b = decode(bin.buffer, true);
  assert.equal(b.stream, "all");
  assert.equal(b.epoch, "EP");
  assert.equal(b.offset, 258);
  assert.deepEqual([...b.data], [0xff, 0]);
  assert.equal(decode("plain", false).data, "plain");
});

test("since lists positions with an epoch, each item percent-encoded, joined by raw commas", () => {
  const since = encodeSince(
    new Map([
      ["user:a,b", { epoch: "E1", offset: 4 }],
      ["all", { epoch: "", offset: 0 }],
      ["channel:x", { epoch: "E2", offset: 9 }],
    ]),
  );
  assert.equal(since, "user%3Aa%2Cb%40E1%3A4,channel%3Ax%40E2%3A9");
});

test("a kick stops the client until it gets a new token, then it recovers what was missed", async () => {
  const h = await connected("kicked");
  const kicked = new Promise((resolve) => h.client.on("kicked", resolve));
  await server.kick("kicked");
  const event = await kicked;
  assert.equal(event.code, 4000);
  assert.equal(h.client.state, State.STOPPED);
  await publishWhileAway("kicked");
  await sleep(300);
  assert.equal(h.got.length, 2, "a kicked client does not reconnect on its own");
  assert.equal(await server.presence("kicked"), 0);
  h.client.setToken(server.token("kicked", ["news"]));
  await assertRecovered(h, "kicked");
});

test("a server restart (SIGTERM, start again) is recovered: 1001, reconnect, new epoch replayed", async () => {
  const h = await connected("restart");
  const closes = [];
  h.client.on("close", (c) => closes.push(c.code));
  proxy.refuse = true; // keep the client out until the messages are published on the new server
  await server.restart();
  assert.ok(closes.includes(1001), `close codes ${closes}`);
  await publishWhileAway("restart");
  proxy.refuse = false;
  await assertRecovered(h, "restart");
  // The restarted server has new epochs: the client was told, and asked for the new epochs from their start.
  assert.ok(h.resyncs.some((r) => r.stream === "user:restart"));
  await server.publish("user/restart", "m5");
  await waitFor(() => dataOf(h.got, "user:restart").at(-1) === "m5", "live after recovery");
  assert.equal(dataOf(h.got, "user:restart").length, 5, "no duplicates");
});

test("a network drop (the proxy kills the TCP connection) is recovered", async () => {
  const h = await connected("dropped");
  proxy.refuse = true;
  proxy.cut();
  await waitFor(() => h.client.state !== State.OPEN, "client notices the drop");
  await publishWhileAway("dropped");
  proxy.refuse = false;
  await assertRecovered(h, "dropped");
});

test("a dead path (nothing arrives, not even pings) is noticed by the read timeout and recovered", async () => {
  const h = await connected("frozen");
  const before = proxy.accepted;
  proxy.freeze();
  await publishWhileAway("frozen");
  await waitFor(() => proxy.accepted > before, "reconnect after the read timeout", 8_000);
  await assertRecovered(h, "frozen");
});

test("a 401 at the handshake stops the client until it gets a new token", async () => {
  const h = open("denied", { token: "not-a-jwt" });
  const failure = await new Promise((resolve) => h.client.on("authfailure", resolve));
  assert.equal(failure.status, 401);
  assert.equal(h.client.state, State.STOPPED);
  h.client.setToken(server.token("denied", ["news"]));
  await waitFor(() => h.client.state === State.OPEN, "open with the new token");
});

test("a slow-consumer close (1008) reconnects with backoff and recovers what was not delivered", async () => {
  // A server of its own with a small outbox, so a stalled reader is closed quickly.
  const slow = await DensepushServer.create({
    // A long close timeout: the 1008 close frame waits behind the stalled bytes until the reader resumes.
    // Slow pings: a stalled reader must overflow the outbox (1008), not miss a pong first (1006).
    websocket: "max_outbox_bytes = 65536\nclose_timeout_ms = 30000\nping_interval_ms = 20000\npong_timeout_ms = 15000",
    admin: "max_publish_bytes = 65536",
  });
  const slowProxy = await Proxy.create(slow.clientPort);
  try {
    const client = connect(slowProxy.url(), { ...FAST, token: slow.token("slow") });
    clients.push(client);
    const got = [];
    const closes = [];
    client.on("message", (m) => got.push(m.data));
    client.on("close", (c) => closes.push(c.code));
    await waitFor(() => client.state === State.OPEN, "open");
    await slow.publish("user/slow", "first");
    await waitFor(() => got.length === 1, "first message");
    slowProxy.stall(true);
    // Enough to fill the loopback socket buffers and then the 64 KiB outbox.
    const body = "x".repeat(16_000);
    const total = 600;
    for (let i = 0; i < total; i++) await slow.publish("user/slow", `${i}:${body}`);
    slowProxy.stall(false);
    await waitFor(() => closes.includes(1008), "close 1008", 15_000).catch((e) => {
      throw new Error(`${e.message}; closes seen: ${closes}`);
    });
    await waitFor(() => got.length === total + 1, `all ${total} messages after recovery`, 20_000);
    assert.deepEqual(
      got.slice(1).map((d) => Number(d.split(":")[0])),
      Array.from({ length: total }, (_, i) => i),
    );
  } finally {
    await slowProxy.close();
    await slow.dispose();
  }
});
