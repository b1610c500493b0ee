#!/usr/bin/env python3
"""Issue 18, "the echo diagnostics buffer is not charged to the budget": with [diagnostics] echo on and a
16 MiB buffer budget, 20 clients each send the first 4 MiB fragment of a message they never finish; prints
the server's RSS, the budget's use and its 1013 closes.

Usage: scripts/probes/echo_budget.py target/release/densepush"""
import struct, sys, time
from common import Server

server = Server(sys.argv[1], "[websocket]\nmax_inbound_message_bytes = 16777216\nmax_outbox_bytes = 16777216\n"
                             "max_buffered_bytes_total = 16777216\n[diagnostics]\necho = true\n")
mask = b"\x01\x02\x03\x04"
payload = b"x" * (4 << 20)
fragment = bytes([0x02, 0x80 | 127]) + struct.pack(">Q", len(payload)) + mask + bytes(
    b ^ mask[i % 4] for i, b in enumerate(payload))
before, conns, refused = server.rss(), [], 0
for i in range(20):
    c = server.upgrade(f"e{i}")
    try:
        c.sendall(fragment)
    except OSError:
        refused += 1
    conns.append(c)
time.sleep(1)
m = server.metrics()
print(f"20 unfinished messages of 4 MiB: server RSS {before} -> {server.rss()} B; densepush_buffered_bytes "
      f"{m['densepush_buffered_bytes']:.0f} of {m['densepush_buffered_bytes_limit']:.0f}; "
      f"1013 closes {m.get('densepush_budget_closes_total', 0):.0f}")
server.stop()
