// The admin dashboard in headless Chromium: loads without console errors, shows the connection count after N
// clients connect, and its deliveries chart moves after a broadcast. With DP_SCREENSHOT=path it also saves a
// screenshot (scripts/dashboard-screenshot.sh uses that for docs/dashboard.png).

import test, { after, before } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { DensepushServer, launchChromium, sleep, waitFor, watchErrors } from "./harness.mjs";

const N = 12;
let browser;
const servers = [];
const sockets = [];

before(async () => {
  browser = await launchChromium();
});

after(async () => {
  for (const ws of sockets) ws.terminate();
  await browser?.close();
  for (const s of servers) await s.dispose();
});

async function openClients(server, n) {
  const opened = [];
  for (let i = 0; i < n; i++) {
    const ws = new WebSocket(`${server.url}?token=${server.token(`dash${i % 5}`, ["news"])}`);
    sockets.push(ws);
    opened.push(new Promise((resolve, reject) => ws.once("open", resolve).once("error", reject)));
  }
  await Promise.all(opened);
}

const text = (page, id) => page.$eval(`#${id}`, (el) => el.textContent);

test("the dashboard shows live connections and its chart moves after a broadcast", async () => {
  const server = await DensepushServer.create();
  servers.push(server);
  const page = await browser.context.newPage();
  const errors = watchErrors(page);
  const response = await page.goto(server.admin + "/");
  assert.equal(response.status(), 200);
  assert.match(response.headers()["content-security-policy"], /default-src 'none'/);
  await waitFor(async () => (await text(page, "connections-open")) === "0", "0 connections shown");

  await openClients(server, N);
  await waitFor(async () => (await text(page, "connections-open")) === String(N), `${N} connections shown`);
  const perReactor = await page.$$eval("#per-reactor li", (lis) => lis.map((li) => li.textContent));
  assert.ok(perReactor.some((r) => r.startsWith("reactor 1")), `per reactor rows: ${perReactor}`);

  // Let the deliveries chart settle at zero, then broadcast and watch it move.
  await sleep(1500);
  const before = await page.$eval("#chart-deliveries", (c) => c.toDataURL());
  const maxBefore = await page.evaluate(() => Math.max(0, ...window.densepushDashboard.series.deliveries.map((p) => p.v)));
  assert.equal(maxBefore, 0);
  for (let i = 0; i < 5; i++) await server.publish("all", `broadcast ${i}`);
  await waitFor(
    () => page.evaluate(() => window.densepushDashboard.series.deliveries.some((p) => p.v > 0)),
    "deliveries/s above zero",
  );
  const afterImage = await page.$eval("#chart-deliveries", (c) => c.toDataURL());
  assert.notEqual(afterImage, before, "the chart was redrawn with the new point");
  assert.equal(await text(page, "frames-total"), String(5 * N));
  assert.equal(await text(page, "cluster-link"), "single node");
  assert.match(await text(page, "history-bytes"), /\//);

  if (process.env.DP_SCREENSHOT) {
    // A minute of steady traffic so the charts have a shape worth showing.
    for (let i = 0; i < 60; i++) {
      const burst = 1 + Math.round(4 + 3 * Math.sin(i / 6));
      for (let j = 0; j < burst; j++) await server.publish(j % 2 ? "all" : "channel/news", `tick ${i}`);
      if (i % 10 === 5) await openClients(server, 3);
      await sleep(1000);
    }
    await page.screenshot({ path: process.env.DP_SCREENSHOT, fullPage: true });
  }
  assert.deepEqual(errors, []);
  await page.close();
});

test("with admin.api_key the page asks for the key and then polls with it", async () => {
  const server = await DensepushServer.create({ apiKey: "dash-secret" });
  servers.push(server);
  const unauthorized = await fetch(server.admin + "/stats");
  assert.equal(unauthorized.status, 401);
  const page = await browser.context.newPage();
  const errors = watchErrors(page);
  await page.goto(server.admin + "/dashboard");
  await page.waitForSelector("#auth-key", { state: "visible" });
  await page.fill("#auth-key", "dash-secret");
  await page.click("#auth button");
  await waitFor(async () => (await text(page, "connections-open")) === "0", "numbers after the key");
  await openClients(server, 2);
  await waitFor(async () => (await text(page, "connections-open")) === "2", "2 connections shown");
  // The first /stats answered 401, which Chromium logs as a failed resource load: that one is expected.
  assert.deepEqual(
    errors.filter((e) => !/401/.test(e)),
    [],
  );
  await page.close();
});
