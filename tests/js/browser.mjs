// Drives examples/browser.html in headless Chromium (the Debian package, /usr/bin/chromium) for
// tests/interop.rs: opens PAGE_URL and prints every "densepush {json}" console line of the page as one JSON
// line on stdout, plus {"event":"driver-ready"} once the page is loading. Exits, closing the browser, when
// stdin ends or after LIMIT_SECS (default 60), so no Chromium outlives a test.
//
// Usage: node browser.mjs PAGE_URL [LIMIT_SECS [CHROMIUM_FLAG...]]
//
// Each CHROMIUM_FLAG is passed to Chromium as is, e.g. `--ignore-certificate-errors-spki-list=<base64>` to
// accept a test server's certificate by its key (wss:// to a server whose CA the browser does not know).
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [pageUrl, limitSecs = "60", ...extraFlags] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const report = (event) => process.stdout.write(JSON.stringify(event) + "\n");
const profile = mkdtempSync(join(tmpdir(), "densepush-chromium-"));

// A fresh profile and no background traffic: the only network this browser uses is the test's loopback.
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    ...extraFlags,
  ],
});
let done = false;
async function finish(code) {
  if (done) return;
  done = true;
  await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
  process.exit(code);
}
process.stdin.on("end", () => finish(0));
process.stdin.resume();
setTimeout(() => finish(0), Number(limitSecs) * 1000).unref();
process.on("SIGTERM", () => finish(0));

const page = context.pages()[0] ?? (await context.newPage());
page.on("console", (msg) => {
  const text = msg.text();
  if (text.startsWith("densepush ")) process.stdout.write(text.slice("densepush ".length) + "\n");
  // Chromium logs why a WebSocket handshake failed (e.g. "Unexpected response code: 403"); the page's own
  // close event cannot see it (it is always 1006).
  else if (msg.type() === "error" && text.includes("WebSocket")) report({ event: "console-error", text });
});
page.on("pageerror", (err) => report({ event: "page-error", error: String(err) }));
report({ event: "driver-ready" });
await page.goto(pageUrl);
