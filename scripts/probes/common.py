"""Shared helpers of the probes: start a densepush binary on free loopback ports with a config of our own,
read its metrics and RSS, open raw WebSocket connections. Standard library only."""
import os, socket, subprocess, tempfile, time, urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """densepush on loopback with `extra` TOML appended to a minimal config (auth none, 1 reactor)."""

    def __init__(self, binary, extra=""):
        self.client, self.admin = free_port(), free_port()
        self.dir = tempfile.TemporaryDirectory()
        config = os.path.join(self.dir.name, "config.toml")
        with open(config, "w") as f:
            f.write(f'[server]\nlisten = "127.0.0.1:{self.client}"\nreactors = 1\n'
                    f'[auth]\nmode = "none"\n[log]\nlevel = "warn"\n{extra}\n'
                    f'[admin]\nlisten = "127.0.0.1:{self.admin}"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("DENSEPUSH_")}
        self.proc = subprocess.Popen([binary, "--config", config], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                self.metrics()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("densepush did not start")

    def metrics(self):
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics").read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name = line.split("{")[0].split(" ")[0]
                out[name] = out.get(name, 0) + float(line.split()[-1])
        return out

    def rss(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) * 1024

    def publish(self, path, body):
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin}{path}", data=body, method="POST")
        return urllib.request.urlopen(req).read()

    def upgrade(self, user):
        c = socket.create_connection(("127.0.0.1", self.client))
        c.sendall(f"GET /ws?user={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += c.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        return c

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        self.dir.cleanup()
