#!/usr/bin/env python3
"""Issue 18, "the per-turn bound counts commands, not sends": N idle connections on one reactor and a probe
that pings every millisecond while 20 messages are published to all, 50 ms apart; the longest wait for a
pong is the longest the reactor went without reading sockets.

Usage: scripts/probes/turn_latency.py target/release/densepush [N=15000]"""
import resource, socket, sys, threading, time
from common import Server

n = int(sys.argv[2]) if len(sys.argv) > 2 else 15000
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 500, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
server = Server(sys.argv[1])
conns = [server.upgrade(f"u{i}") for i in range(n)]
probe = server.upgrade("probe")
probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
worst, stop = 0.0, False


def prober():
    global worst
    while not stop:
        sent = time.perf_counter()
        probe.sendall(bytes([0x89, 0x80, 1, 2, 3, 4]))  # a masked, empty ping
        while True:
            head = probe.recv(2)
            if head[0] & 0x0F == 0xA:
                break
            probe.recv(head[1] & 0x7F)  # a pushed message: skip it
        worst = max(worst, time.perf_counter() - sent)
        time.sleep(0.001)


thread = threading.Thread(target=prober)
thread.start()
time.sleep(0.5)
worst = 0.0
for _ in range(20):
    server.publish("/publish/all", b"m")
    time.sleep(0.05)
time.sleep(1)
stop = True
thread.join()
yields = server.metrics().get("densepush_fanout_yields_total", 0)
print(f"{n} connections, 20 publishes to all: longest pong wait {worst * 1000:.1f} ms, fanout yields {yields:.0f}")
server.stop()
