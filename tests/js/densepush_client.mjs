// The densepush JavaScript client (clients/js) in Node with `ws`, driven by tests/interop.rs.
//
// Usage: node densepush_client.mjs URL TOKEN
//
// Connects through a TCP gate (the Proxy of clients/js/test/harness.mjs) in front of URL's port, so the test
// can keep the client out while the server restarts: a line "refuse" on stdin makes the gate close new
// connections at once, "allow" lets them through again; each is acknowledged with {"event":"gate"}. TLS passes
// through the gate untouched: for wss:// URLs the client trusts what Node does plus NODE_EXTRA_CA_CERTS.
//
// Prints one JSON object per line on stdout: {"event":"open"}, {"event":"message","stream":"user:42",
// "data":"...","offset":1}, {"event":"resync","stream":"user:42"}, {"event":"close","code":1001},
// {"event":"gate","refuse":true}, {"event":"stopped"} (the client gave up: kicked or refused).
import { createInterface } from "node:readline";
import WebSocket from "ws";
import { connect } from "../../clients/js/index.js";
import { Proxy } from "../../clients/js/test/harness.mjs";

const [url, token] = process.argv.slice(2);
const report = (event) => process.stdout.write(JSON.stringify(event) + "\n");

const target = new URL(url);
const gate = await Proxy.create(Number(target.port));
target.port = String(gate.port);

const client = connect(target.toString(), {
  WebSocket,
  token,
  initialBackoffMs: 50,
  maxBackoffMs: 400,
  goingAwayMaxDelayMs: 100,
  // Refused attempts while the gate is shut carry no HTTP status: they must not be taken for auth failures.
  authFailureAfter: 1_000_000,
});
client.on("open", () => report({ event: "open" }));
client.on("message", (m) => report({ event: "message", stream: m.stream, data: String(m.data), offset: m.offset }));
client.on("resync", (r) => report({ event: "resync", stream: r.stream }));
client.on("close", (c) => report({ event: "close", code: c.code }));
client.on("kicked", () => report({ event: "stopped" }));
client.on("authfailure", () => report({ event: "stopped" }));

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  if (line === "refuse" || line === "allow") {
    gate.refuse = line === "refuse";
    report({ event: "gate", refuse: gate.refuse });
  }
});
lines.on("close", async () => {
  client.close();
  await gate.close();
  process.exit(0);
});
