#!/usr/bin/env python3
"""Issue 18, "mailbox contents are outside the buffer budget": stops the reactor thread alone (ptrace on its
thread id; the admin thread keeps answering), publishes 1 MiB messages until the admin API refuses one, and
prints what the server then holds.

Usage: scripts/probes/mailbox_stall.py target/release/densepush
Needs ptrace of a child (the server is started as one), which kernel.yama.ptrace_scope 1 allows."""
import ctypes, os, socket, sys, time
from common import Server

libc = ctypes.CDLL("libc.so.6", use_errno=True)
PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT, WALL = 17, 0x4206, 0x4207, 0x40000000

server = Server(sys.argv[1])
task = f"/proc/{server.proc.pid}/task"
tid = next(int(t) for t in os.listdir(task) if open(f"{task}/{t}/comm").read().strip() == "reactor-0")
assert libc.ptrace(PTRACE_SEIZE, tid, 0, 0) == 0, os.strerror(ctypes.get_errno())
assert libc.ptrace(PTRACE_INTERRUPT, tid, 0, 0) == 0
os.waitpid(tid, WALL)
before = server.rss()
body = b"x" * (1 << 20)
admin = socket.create_connection(("127.0.0.1", server.admin))
accepted, status, started = 0, 202, time.time()
while status == 202 and time.time() - started < 120:
    admin.sendall(b"POST /publish/all HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    head = b""
    while b"\r\n\r\n" not in head:
        head += admin.recv(1)
    status = int(head.split()[1])
    length = int(next(l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")).split(b":")[1])
    left = length
    while left:
        left -= len(admin.recv(left))
    accepted += status == 202
m = server.metrics()
print(f"reactor stopped: {accepted} publishes of 1 MiB accepted, then {status}; server RSS {before} -> "
      f"{server.rss()} B; densepush_buffered_bytes {m.get('densepush_buffered_bytes', 0):.0f} of "
      f"{m.get('densepush_buffered_bytes_limit', 0):.0f}")
libc.ptrace(PTRACE_DETACH, tid, 0, 0)
server.stop()
