// Headless Chromium against the real server, through a proxy that blocks WebSocket upgrades (403) and lets
// plain HTTP through, as some corporate proxies do: the client falls back to EventSource after N failed
// WebSocket opens, receives every publish kind as events, resumes after a cut through the browser's own
// Last-Event-ID, and stops at a kick's `event: close`. Also: Chromium negotiates permessage-deflate when the
// server has compression on (`ws.extensions`).

import test, { after, before } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { readFileSync } from "node:fs";
import { DensepushServer, Proxy, launchChromium, sleep, waitFor, watchErrors } from "./harness.mjs";

const MODULE = readFileSync(new URL("../index.js", import.meta.url));
const PAGE = `<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>sse test</title>
<script type="module">
import * as dp from "/index.js";
window.handles = {};
window.open_ = (name, url, token) => {
  const h = { got: [], resyncs: [], kicked: [], fallbacks: [] };
  h.client = dp.connect(url, { token, initialBackoffMs: 50, maxBackoffMs: 200, sseFallbackAfter: 2 });
  h.client.on("message", (m) => h.got.push({ stream: m.stream ?? null, binary: m.binary,
    data: m.binary ? Array.from(m.data) : m.data }));
  h.client.on("resync", (r) => h.resyncs.push(r));
  h.client.on("kicked", (k) => h.kicked.push(k.code));
  h.client.on("fallback", (f) => h.fallbacks.push(f.transport));
  window.handles[name] = h;
};
window.extensionsOf = (url) => new Promise((resolve, reject) => {
  const ws = new WebSocket(url);
  ws.onopen = () => { resolve(ws.extensions); ws.close(); };
  ws.onerror = () => reject(new Error("websocket failed"));
});
window.ready = true;
</script>`;

let server;
let proxy;
let web;
let browser;
let page;
let errors;

before(async () => {
  server = await DensepushServer.create({ server: "sse_retry_ms = 200", websocket: "compression = true" });
  proxy = await Proxy.create(server.clientPort);
  web = http.createServer((req, res) => {
    if (req.url === "/index.js") {
      res.writeHead(200, { "Content-Type": "text/javascript" }).end(MODULE);
    } else {
      res.writeHead(200, { "Content-Type": "text/html" }).end(PAGE);
    }
  });
  await new Promise((resolve) => web.listen(0, "127.0.0.1", resolve));
  browser = await launchChromium();
  page = await browser.context.newPage();
  errors = watchErrors(page);
  await page.goto(`http://127.0.0.1:${web.address().port}/`);
  await page.waitForFunction(() => window.ready === true);
});

after(async () => {
  await browser?.close();
  web?.close();
  await proxy?.close();
  await server?.dispose();
});

const handle = (name, f) => page.evaluate(([n, src]) => eval(src)(window.handles[n]), [name, f.toString()]);
const state = (name) => handle(name, (h) => h.client.state);
const got = (name) => handle(name, (h) => h.got);
const texts = async (name, stream) => (await got(name)).filter((m) => m.stream === stream && !m.binary).map((m) => m.data);

test("chromium negotiates permessage-deflate when compression is on", async () => {
  const extensions = await page.evaluate((url) => window.extensionsOf(url), `${server.url}?token=${server.token("ext")}`);
  assert.match(extensions, /^permessage-deflate/);
  assert.match(extensions, /server_no_context_takeover/);
});

test("upgrades blocked: the client falls back to EventSource and gets every publish kind", async () => {
  proxy.refuseUpgrades = true;
  const token = server.token("sse1", ["news"]);
  await page.evaluate(([n, url, t]) => window.open_(n, url, t), ["sse1", proxy.url(), token]);
  await waitFor(async () => (await state("sse1")) === "open", "open over SSE");
  assert.equal(await handle("sse1", (h) => h.client.transport), "sse");
  assert.deepEqual(await handle("sse1", (h) => h.fallbacks), ["sse"]);
  await server.publish("user/sse1", "to the user");
  await server.publish("channel/news", "to the channel");
  await server.publish("all", "to everyone ✓");
  const binary = await fetch(`${server.admin}/publish/user/sse1`, {
    method: "POST",
    body: new Uint8Array([0, 1, 2, 255]),
    headers: { "Content-Type": "application/octet-stream" },
  });
  assert.equal(binary.status, 202);
  await server.publish("user/sse1", "line one\nline two");
  await waitFor(async () => (await got("sse1")).length === 5, "five events");
  const all = await got("sse1");
  assert.deepEqual(all.map((m) => m.stream), ["user:sse1", "channel:news", "all", "user:sse1", "user:sse1"]);
  assert.deepEqual(all.map((m) => m.data), ["to the user", "to the channel", "to everyone ✓", [0, 1, 2, 255], "line one\nline two"]);
  assert.equal(all[3].binary, true);
});

test("a cut is resumed by the browser's own reconnect with Last-Event-ID", async () => {
  const before = proxy.requests.length;
  proxy.refuse = true;
  proxy.cut();
  await waitFor(async () => (await state("sse1")) !== "open", "the client notices the cut");
  for (const m of ["m2", "m3", "m4"]) await server.publish("user/sse1", m);
  proxy.refuse = false;
  await waitFor(async () => (await texts("sse1", "user:sse1")).includes("m4"), "missed messages");
  const user = await texts("sse1", "user:sse1");
  assert.deepEqual(user, ["to the user", "line one\nline two", "m2", "m3", "m4"], "in order, no duplicate");
  const resumed = proxy.requests.slice(before).filter((r) => r.startsWith("GET /sse"));
  assert.ok(resumed.length >= 1, "reconnected over SSE");
  assert.match(resumed.at(-1), /\r\nLast-Event-ID: user:sse1@\w+:\d+\r\n/i);
  assert.equal(await state("sse1"), "open");
});

test("a kick ends the stream with event: close and the client stops", async () => {
  await server.kick("sse1");
  await waitFor(async () => (await state("sse1")) === "stopped", "stopped after the kick");
  assert.deepEqual(await handle("sse1", (h) => h.kicked), [4000]);
  await sleep(500);
  assert.equal(await server.presence("sse1"), 0, "EventSource did not come back by itself");
});

test("no uncaught errors on the page", () => {
  // Chromium logs refused upgrades and EventSource reconnects itself; anything else is a bug in the client.
  const ours = errors.filter(
    (e) => !/WebSocket connection to .* failed|EventSource|net::ERR|Failed to load resource/.test(e),
  );
  assert.deepEqual(ours, []);
});
