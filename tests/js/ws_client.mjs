// A densepush client on the Node `ws` library, driven by tests/interop.rs.
//
// Usage: node ws_client.mjs URL [--bearer TOKEN]
//
// Prints one JSON object per line on stdout, the same events as tests/clients/ws_client.py:
//   {"event":"open"}, {"event":"ping"} (server keepalive; `ws` answers it with a pong by itself),
//   {"event":"message","type":"text","data":"..."}, {"event":"message","type":"binary","hex":"0a0b"},
//   {"event":"close","code":4000,"reason":"...","by":"server"|"client"}, {"event":"error","error":"..."}.
// A text message "please-close:CODE" makes the client start the close handshake with CODE; the close event
// then reports the code the server echoed.
import WebSocket from "ws";

const [url, flag, token] = process.argv.slice(2);
const headers = flag === "--bearer" ? { Authorization: `Bearer ${token}` } : {};
const report = (event) => process.stdout.write(JSON.stringify(event) + "\n");

const ws = new WebSocket(url, { headers, handshakeTimeout: 10000 });
let closedByUs = false;
ws.on("open", () => report({ event: "open" }));
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
