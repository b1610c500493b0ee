//! The admin listener: its own thread and `mio` poll, HTTP/1.1 connections with keep-alive and pipelining.
//!
//! It owns the admin sockets, their buffers and the accept loop, and hands each complete request to the
//! handlers (`api`). It does not decide what a request does.

use super::api::{Api, Reply};
use super::http::{self, Method};
use crate::accept::Acceptor;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::io::{self, Read, Write};

const LISTENER: Token = Token(usize::MAX);

/// How often a paused admin listener retries `accept`.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// The admin listener and its connections.
pub struct AdminServer {
    poll: Poll,
    listener: TcpListener,
    acceptor: Acceptor,
    conns: Slab<AdminConn>,
    limits: http::Limits,
    api: Api,
}

struct AdminConn {
    stream: TcpStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    close_after_write: bool,
}

impl AdminServer {
    /// An admin server on an already bound, non-blocking listener.
    pub fn new(
        listener: std::net::TcpListener,
        limits: http::Limits,
        api: Api,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(AdminServer {
            poll,
            listener,
            acceptor: Acceptor::default(),
            conns: Slab::new(),
            limits,
            api,
        })
    }

    /// Serves until the process exits.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self.acceptor.is_paused().then_some(ACCEPT_RETRY);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("admin poll failed, admin API stops: {e}");
                return;
            }
            if self.acceptor.is_paused() {
                self.accept_all();
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    Token(key) => {
                        if event.is_writable() || event.is_error() {
                            self.write_out(key);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_in(key);
                        }
                    }
                }
            }
        }
    }

    fn accept_all(&mut self) {
        let (conns, poll) = (&mut self.conns, &self.poll);
        self.acceptor.accept_all(
            &self.listener,
            "admin listener",
            |mut stream| {
                let entry = conns.vacant_entry();
                let token = Token(entry.key());
                if poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                    .is_ok()
                {
                    entry.insert(AdminConn {
                        stream,
                        inbuf: Vec::new(),
                        outbuf: Vec::new(),
                        close_after_write: false,
                    });
                }
            },
            || {},
        );
    }

    fn read_in(&mut self, key: usize) {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if conn.close_after_write {
                return;
            }
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    // The client is done sending; answer what it sent, then close.
                    conn.close_after_write = true;
                    break;
                }
                Ok(n) => conn.inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.conns.remove(key);
                    return;
                }
            }
        }
        self.serve_buffered(key);
        self.write_out(key);
    }

    /// Answers every complete request in the input buffer, in order (pipelining).
    fn serve_buffered(&mut self, key: usize) {
        loop {
            let conn = &mut self.conns[key];
            match http::parse_request(&conn.inbuf, &self.limits) {
                Ok(None) => return,
                Ok(Some((request, consumed))) => {
                    conn.inbuf.drain(..consumed);
                    let keep_alive = request.keep_alive;
                    let head_only = request.method == Method::Head;
                    let reply = self.api.handle(&request);
                    self.respond(key, reply, keep_alive, head_only);
                    if !keep_alive {
                        return;
                    }
                }
                Err(error) => {
                    let reply = Reply::error(error.status(), error.message());
                    self.respond(key, reply, false, false);
                    return;
                }
            }
        }
    }

    fn respond(&mut self, key: usize, reply: Reply, keep_alive: bool, head_only: bool) {
        self.api.count(reply.status);
        let conn = &mut self.conns[key];
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        if head_only {
            // HEAD: the GET answer's headers, Content-Length included, without its body (RFC 9110 §9.3.2).
            let length = reply.body.len();
            http::write_response_head(
                &mut conn.outbuf,
                reply.status,
                reply.content_type,
                &headers,
                length,
                keep_alive,
            );
        } else {
            http::write_response(
                &mut conn.outbuf,
                reply.status,
                reply.content_type,
                &headers,
                &reply.body,
                keep_alive,
            );
        }
        if !keep_alive {
            conn.close_after_write = true;
            conn.inbuf.clear();
        }
    }

    fn write_out(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        while !conn.outbuf.is_empty() {
            match conn.stream.write(&conn.outbuf) {
                Ok(0) => break,
                Ok(n) => {
                    conn.outbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.conns.remove(key);
                    return;
                }
            }
        }
        if conn.close_after_write {
            self.conns.remove(key);
        }
    }
}
