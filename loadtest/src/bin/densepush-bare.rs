//! `densepush-bare`: the floor densepush is measured against, as a load-test target. One thread, one mio
//! poll, a `Slab` of (socket, user id) and a `HashMap<String, Vec<usize>>` from user to slab keys — the "bare
//! mio loop" of `../shared/DENSITY.md` and issue 15. It answers the same WebSocket upgrade
//! (`GET /ws?user=U…`, identity taken from the query as densepush's `auth.mode = "none"` does) and, on an admin
//! port, `POST /publish/user/{u}` and `POST /publish/all` with 202, writing one unmasked frame per recipient
//! straight to its socket. No pings, no timeouts, no validation, no history: what is left is the cost of
//! the work itself, so a ratio against it is the price of everything densepush adds.
//!
//! It is a stand-in for densepush under `scripts/loadtest.sh` (`DENSEPUSH_BIN=…/densepush-bare`): it ignores
//! its arguments, binds both ports on 127.0.0.1:0, prints densepush's `densepush listening client=… admin=…`
//! line and exits 0 on SIGTERM. Bytes the kernel does not take are kept per connection until writable
//! (only under a burst), so every message arrives whole.

use base64::Engine as _;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use sha1::{Digest, Sha1};
use slab::Slab;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const CLIENTS: Token = Token(usize::MAX);
const ADMIN: Token = Token(usize::MAX - 1);
/// Admin connections' tokens start here; client slab keys stay below.
const ADMIN_BASE: usize = 1 << 40;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// One client: its socket and user id, nothing else while idle.
struct Client {
    stream: TcpStream,
    user: String,
}

struct Admin {
    stream: TcpStream,
    input: Vec<u8>,
}

struct Bare {
    clients: Slab<Client>,
    users: HashMap<String, Vec<usize>>,
    /// Request heads not complete in one read, and bytes the kernel did not take; both rare.
    partial_heads: HashMap<usize, Vec<u8>>,
    unsent: HashMap<usize, Vec<u8>>,
    admins: Slab<Admin>,
    scratch: Vec<u8>,
    frame: Vec<u8>,
}

fn main() -> io::Result<()> {
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut poll = Poll::new()?;
    let mut clients = TcpListener::bind("127.0.0.1:0".parse().unwrap())?;
    let mut admin = TcpListener::bind("127.0.0.1:0".parse().unwrap())?;
    poll.registry()
        .register(&mut clients, CLIENTS, Interest::READABLE)?;
    poll.registry()
        .register(&mut admin, ADMIN, Interest::READABLE)?;
    println!(
        "densepush listening client={} admin={}",
        clients.local_addr()?,
        admin.local_addr()?
    );
    io::stdout().flush()?;
    let mut bare = Bare {
        clients: Slab::new(),
        users: HashMap::new(),
        partial_heads: HashMap::new(),
        unsent: HashMap::new(),
        admins: Slab::new(),
        scratch: vec![0; 64 * 1024],
        frame: Vec::new(),
    };
    let mut events = Events::with_capacity(1024);
    while !STOP.load(Ordering::Relaxed) {
        match poll.poll(&mut events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            match event.token() {
                CLIENTS => bare.accept_clients(&poll, &clients),
                ADMIN => bare.accept_admins(&poll, &admin),
                Token(t) if t >= ADMIN_BASE => bare.admin_ready(t - ADMIN_BASE),
                Token(key) => {
                    if event.is_writable() {
                        bare.flush(key);
                    }
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        bare.client_readable(key);
                    }
                }
            }
        }
    }
    Ok(())
}

impl Bare {
    fn accept_clients(&mut self, poll: &Poll, listener: &TcpListener) {
        while let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.set_nodelay(true);
            let entry = self.clients.vacant_entry();
            if poll
                .registry()
                .register(
                    &mut stream,
                    Token(entry.key()),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_ok()
            {
                entry.insert(Client {
                    stream,
                    user: String::new(),
                });
            }
        }
    }

    fn accept_admins(&mut self, poll: &Poll, listener: &TcpListener) {
        while let Ok((mut stream, _)) = listener.accept() {
            let _ = stream.set_nodelay(true);
            let entry = self.admins.vacant_entry();
            let token = Token(ADMIN_BASE + entry.key());
            if poll
                .registry()
                .register(&mut stream, token, Interest::READABLE)
                .is_ok()
            {
                entry.insert(Admin {
                    stream,
                    input: Vec::new(),
                });
            }
        }
    }

    fn remove(&mut self, key: usize) {
        let Some(client) = self.clients.try_remove(key) else {
            return;
        };
        self.partial_heads.remove(&key);
        self.unsent.remove(&key);
        if let Some(keys) = self.users.get_mut(&client.user) {
            keys.retain(|&k| k != key);
            if keys.is_empty() {
                self.users.remove(&client.user);
            }
        }
    }

    fn client_readable(&mut self, key: usize) {
        loop {
            let Some(client) = self.clients.get_mut(key) else {
                return;
            };
            match client.stream.read(&mut self.scratch) {
                Ok(0) => return self.remove(key),
                Ok(n) if client.user.is_empty() => {
                    let mut head = self.partial_heads.remove(&key).unwrap_or_default();
                    head.extend_from_slice(&self.scratch[..n]);
                    if !self.upgrade(key, head) {
                        return self.remove(key);
                    }
                }
                // Client frames (pongs, close) are read and dropped.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.remove(key),
            }
        }
    }

    /// Answers a complete upgrade request (RFC 6455 §4.2.2) and indexes the connection under `?user=`; keeps
    /// an incomplete head. False closes the connection.
    fn upgrade(&mut self, key: usize, head: Vec<u8>) -> bool {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                self.partial_heads.insert(key, head);
                return true;
            }
            Err(_) => return false,
        }
        let Some(user) = request
            .path
            .and_then(|p| p.split_once('?'))
            .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("user=")))
            .filter(|u| !u.is_empty())
        else {
            return false;
        };
        let Some(ws_key) = request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
        else {
            return false;
        };
        let mut sha = Sha1::new();
        sha.update(ws_key.value);
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        let user = user.to_owned();
        self.users.entry(user.clone()).or_default().push(key);
        self.clients[key].user = user;
        self.send(key, response.as_bytes());
        true
    }

    /// Writes to a client, keeping what the kernel does not take until it is writable.
    fn send(&mut self, key: usize, bytes: &[u8]) {
        if let Some(unsent) = self.unsent.get_mut(&key) {
            unsent.extend_from_slice(bytes);
            return;
        }
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        let mut written = 0;
        while written < bytes.len() {
            match client.stream.write(&bytes[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.unsent.insert(key, bytes[written..].to_vec());
                    return;
                }
                Err(_) => return self.remove(key),
            }
        }
    }

    fn flush(&mut self, key: usize) {
        if let Some(unsent) = self.unsent.remove(&key) {
            self.send(key, &unsent);
        }
    }

    fn admin_ready(&mut self, key: usize) {
        loop {
            let Some(admin) = self.admins.get_mut(key) else {
                return;
            };
            match admin.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.admins.remove(key);
                    return;
                }
                Ok(n) => {
                    admin.input.extend_from_slice(&self.scratch[..n]);
                    self.serve_admin(key);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.admins.remove(key);
                    return;
                }
            }
        }
    }

    /// Answers every complete request in an admin connection's input.
    fn serve_admin(&mut self, key: usize) {
        loop {
            let mut input = std::mem::take(&mut self.admins[key].input);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            let head_len = match request.parse(&input) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => {
                    self.admins[key].input = input;
                    return;
                }
                Err(_) => {
                    self.admins.remove(key);
                    return;
                }
            };
            let body_len = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0usize);
            if input.len() < head_len + body_len {
                self.admins[key].input = input;
                return;
            }
            let binary = request.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("content-type")
                    && h.value.starts_with(b"application/octet-stream")
            });
            let path = request.path.unwrap_or("").to_owned();
            let body = &input[head_len..head_len + body_len];
            encode_frame(&mut self.frame, !binary, body);
            let status = if let Some(user) = path.strip_prefix("/publish/user/") {
                let frame = std::mem::take(&mut self.frame);
                let keys = self.users.get(user).cloned().unwrap_or_default();
                for k in keys {
                    self.send(k, &frame);
                }
                self.frame = frame;
                "202 Accepted"
            } else if path == "/publish/all" {
                let frame = std::mem::take(&mut self.frame);
                let keys: Vec<usize> = self
                    .clients
                    .iter()
                    .filter(|(_, c)| !c.user.is_empty())
                    .map(|(k, _)| k)
                    .collect();
                for k in keys {
                    self.send(k, &frame);
                }
                self.frame = frame;
                "202 Accepted"
            } else {
                "404 Not Found"
            };
            input.drain(..head_len + body_len);
            let response = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            let admin = &mut self.admins[key];
            admin.input = input;
            // Publishers wait for each answer, so one small write is taken whole.
            if admin.stream.write_all(response.as_bytes()).is_err() {
                self.admins.remove(key);
                return;
            }
        }
    }
}

/// An unmasked data frame (RFC 6455 §5.2: a server never masks).
fn encode_frame(out: &mut Vec<u8>, text: bool, payload: &[u8]) {
    out.clear();
    out.push(if text { 0x81 } else { 0x82 });
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}
