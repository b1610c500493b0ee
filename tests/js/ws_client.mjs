// A densepush client on the Node `ws` library, driven by tests/interop.rs.
//
// Usage: node ws_client.mjs URL [--bearer TOKEN] [--ca FILE]
//
// For a wss:// URL, --ca makes the client trust only the CA certificates in FILE (instead of Node's store).
//
// Prints one JSON object per line on stdout, the same events as tests/clients/ws_client.py:
//   {"event":"open"}, {"event":"ping"} (server keepalive; `ws` answers it with a pong by itself),
//   {"event":"message","type":"text","data":"..."}, {"event":"message","type":"binary","hex":"0a0b"},
//   {"event":"close","code":4000,"reason":"...","by":"server"|"client"}, {"event":"error","error":"..."}.
// A text message "please-close:CODE" makes the client start the close handshake with CODE; the close event
// then reports the code the server echoed.
import { readFileSync } from "node:fs";
import WebSocket from "ws";

const [url, ...rest] = process.argv.slice(2);
const options = { headers: {}, handshakeTimeout: 10000 };
for (let i = 0; i < rest.length; i += 2) {
  const [flag, value] = [rest[i], rest[i + 1]];
  if (flag === "--bearer") options.headers.Authorization = `Bearer ${value}`;
  else if (flag === "--ca") options.ca = readFileSync(value);
  else throw new Error(`unknown option ${flag}`);
}
const report = (event) => process.stdout.write(JSON.stringify(event) + "\n");

const ws = new WebSocket(url, options);
let closedByUs = false;
// `extensions`: the negotiated extensions (e.g. "permessage-deflate"), "" when none.
ws.on("open", () => report({ event: "open", extensions: ws.extensions }));
ws.on("ping", () => report({ event: "ping" }));
ws.on("message", (data, isBinary) => {
  if (isBinary) {
    report({ event: "message", type: "binary", hex: Buffer.from(data).toString("hex") });
    return;
  }
  const text = data.toString("utf8");
  report({ event: "message", type: "text", data: text });
  if (text.startsWith("please-close:")) {
    closedByUs = true;
    ws.close(Number(text.slice("please-close:".length)), "client says bye");
  }
});
ws.on("unexpected-response", (_req, res) => {
  report({ event: "error", error: `HTTP ${res.statusCode}` });
  process.exit(1);
});
ws.on("error", (err) => report({ event: "error", error: String(err) }));
// `code` is the code of the close frame the server sent (1005 if it had none, 1006 if none arrived).
ws.on("close", (code, reason) => {
  report({ event: "close", code, reason: reason.toString("utf8"), by: closedByUs ? "client" : "server" });
});
