// The client in headless Chromium (the browser's own WebSocket), against the real server: kick, restart and a
// network drop all end in a reconnect that recovers every message published meanwhile, in order.

import test, { after, before } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { readFileSync } from "node:fs";
import { DensepushServer, Proxy, launchChromium, sleep, waitFor, watchErrors } from "./harness.mjs";

const MODULE = readFileSync(new URL("../index.js", import.meta.url));
const PAGE = `<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>client test</title>
<script type="module">
import * as dp from "/index.js";
window.dp = dp;
window.handles = {};
window.open_ = (name, url, token) => {
  const h = { got: [], resyncs: [], kicked: [], closes: [] };
  h.client = dp.connect(url, { token, initialBackoffMs: 50, maxBackoffMs: 400, goingAwayMaxDelayMs: 100 });
  h.client.on("message", (m) => h.got.push({ stream: m.stream, data: m.data }));
  h.client.on("resync", (r) => h.resyncs.push(r));
  h.client.on("kicked", (k) => h.kicked.push(k.code));
  h.client.on("close", (c) => h.closes.push(c.code));
  window.handles[name] = h;
};
window.ready = true;
</script>`;

let server;
let proxy;
let web;
let browser;
let page;
let errors;

before(async () => {
  server = await DensepushServer.create();
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

const state = (name) => page.evaluate((n) => window.handles[n].client.state, name);
const got = (name, stream) =>
  page.evaluate(([n, s]) => window.handles[n].got.filter((m) => m.stream === s).map((m) => m.data), [name, stream]);

async function connected(user) {
  await page.evaluate(([n, url, token]) => window.open_(n, url, token), [user, proxy.url(), server.token(user, ["news"])]);
  await waitFor(async () => (await state(user)) === "open", "open in the browser");
  await server.publish(`user/${user}`, "m1");
  await server.publish("channel/news", `${user}-n1`);
  await waitFor(async () => (await got(user, `user:${user}`)).length === 1, "first message");
}

async function publishWhileAway(user) {
  for (const m of ["m2", "m3", "m4"]) await server.publish(`user/${user}`, m);
  await server.publish("channel/news", `${user}-n2`);
}

async function assertRecovered(user) {
  await waitFor(async () => (await got(user, `user:${user}`)).length === 4, "recovered messages");
  assert.deepEqual(await got(user, `user:${user}`), ["m1", "m2", "m3", "m4"]);
  await waitFor(async () => (await got(user, "channel:news")).includes(`${user}-n2`), "recovered channel message");
  const news = (await got(user, "channel:news")).filter((d) => d.startsWith(`${user}-`));
  assert.deepEqual(news, [`${user}-n1`, `${user}-n2`]);
}

test("browser: a kick stops the client; a new token reconnects and recovers", async () => {
  await connected("bkick");
  await server.kick("bkick");
  await waitFor(async () => (await state("bkick")) === "stopped", "stopped after the kick");
  await publishWhileAway("bkick");
  await sleep(300);
  assert.equal((await got("bkick", "user:bkick")).length, 1);
  await page.evaluate(([n, t]) => window.handles[n].client.setToken(t), ["bkick", server.token("bkick", ["news"])]);
  await assertRecovered("bkick");
});

test("browser: a server restart is recovered", async () => {
  await connected("brestart");
  proxy.refuse = true;
  await server.restart();
  await waitFor(
    async () => (await page.evaluate(() => window.handles.brestart.closes)).includes(1001),
    "close 1001 seen by the browser",
  );
  await publishWhileAway("brestart");
  proxy.refuse = false;
  await assertRecovered("brestart");
});

test("browser: a network drop is recovered", async () => {
  await connected("bdrop");
  proxy.refuse = true;
  proxy.cut();
  await waitFor(async () => (await state("bdrop")) !== "open", "the browser notices the drop");
  await publishWhileAway("bdrop");
  proxy.refuse = false;
  await assertRecovered("bdrop");
});

test("browser: no uncaught errors on the page", () => {
  // Failed connection attempts while the server is down are logged by Chromium itself as
  // "WebSocket connection to ... failed"; anything else is a bug in the client.
  const ours = errors.filter((e) => !/WebSocket connection to .* failed/.test(e));
  assert.deepEqual(ours, []);
});
