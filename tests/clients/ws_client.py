#!/usr/bin/env python3
"""A densepush client on the Python `websockets` library, driven by tests/interop.rs.

Usage: ws_client.py URL [--bearer TOKEN] [--ca FILE]

Connects (with `Authorization: Bearer TOKEN` when given, so the token can also stay out of the URL; for a
wss:// URL trusting only the CA certificates in FILE when given, the system's otherwise), then prints one
JSON object per line on stdout for everything that happens:

  {"event": "open", "extensions": "..."}   (the Sec-WebSocket-Extensions the server answered, or null)
  {"event": "message", "type": "text", "data": "..."}
  {"event": "message", "type": "binary", "hex": "0a0b"}
  {"event": "close", "code": 4000, "reason": "...", "by": "server"|"client"}
  {"event": "error", "error": "..."}

A text message "please-close:CODE" makes the client start the close handshake itself with CODE; the close
event then reports the code the server echoed. Pings from the server are answered by the library (we turn off
the library's own pings, so the keepalive seen is the server's).
"""

import json
import ssl
import sys

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect


def report(**event):
    print(json.dumps(event), flush=True)


def main():
    url, options = sys.argv[1], sys.argv[2:]
    headers = {}
    context = None
    while options:
        flag, value, options = options[0], options[1], options[2:]
        if flag == "--bearer":
            headers["Authorization"] = "Bearer " + value
        elif flag == "--ca":
            context = ssl.create_default_context(cafile=value)
        else:
            raise SystemExit(f"unknown option {flag}")
    try:
        ws = connect(url, additional_headers=headers, ping_interval=None, open_timeout=10, ssl=context)
    except Exception as exc:  # refused upgrade, connection error
        report(event="error", error=str(exc))
        return 1
    report(event="open", extensions=ws.response.headers.get("Sec-WebSocket-Extensions"))
    try:
        for message in ws:
            if isinstance(message, str):
                report(event="message", type="text", data=message)
                if message.startswith("please-close:"):
                    ws.close(code=int(message.split(":", 1)[1]), reason="client says bye")
                    break
            else:
                report(event="message", type="binary", hex=message.hex())
    except ConnectionClosed:
        pass
    # close_rcvd is the close frame the server sent: its own, or its echo of ours when we closed first.
    rcvd = ws.protocol.close_rcvd
    by = "client" if ws.protocol.close_rcvd_then_sent is False else "server"
    report(
        event="close",
        code=rcvd.code if rcvd is not None else None,
        reason=rcvd.reason if rcvd is not None else None,
        by=by,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
