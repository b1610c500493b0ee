"""Idle cost of a Server-Sent Events stream against an idle WebSocket connection (issue 17): the server's RSS
slope between 2,000 and 8,000 connections of one kind (1 reactor, each kind on a fresh server), three rounds
alternating the kinds. Every connection is a distinct user. Standard library only.

Usage: python3 scripts/probes/sse_idle.py [BINARY]   (default target/release/densepush)
Prints one line per run: kind, bytes per connection, and a summary with the medians."""
import socket, statistics, sys, time
from common import Server

LOW, HIGH = 2000, 8000


def open_sse(server, user):
    c = socket.create_connection(("127.0.0.1", server.client))
    c.sendall(f"GET /sse?user={user} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    got = b""
    while not got.endswith(b"\n\n") or b"retry:" not in got:
        got += c.recv(1)
    assert got.startswith(b"HTTP/1.1 200"), got
    return c


def slope(binary, kind):
    server = Server(binary)
    conns = []
    try:
        opener = open_sse if kind == "sse" else lambda s, u: s.upgrade(u)
        rss = {}
        for target in (LOW, HIGH):
            while len(conns) < target:
                conns.append(opener(server, f"u{len(conns)}"))
            time.sleep(1.0)
            rss[target] = server.rss()
        return (rss[HIGH] - rss[LOW]) / (HIGH - LOW)
    finally:
        for c in conns:
            c.close()
        server.stop()


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/densepush"
    runs = {"ws": [], "sse": []}
    for _ in range(3):
        for kind in ("ws", "sse"):
            b = slope(binary, kind)
            runs[kind].append(b)
            print(f"{kind:4} {b:7.1f} B/conn", flush=True)
    print("median ws %.1f B/conn, sse %.1f B/conn" % (statistics.median(runs["ws"]), statistics.median(runs["sse"])))


if __name__ == "__main__":
    main()
