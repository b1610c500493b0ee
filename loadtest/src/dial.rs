//! Opening client sockets: non-blocking connect from a chosen loopback source address, bound before connecting
//! with `IP_BIND_ADDRESS_NO_PORT`, and naming why a connection failed.
//!
//! It owns socket creation and error classification. It does not drive the connection afterwards.
//!
//! Why bind first: one source address has ~28k ephemeral ports (net.ipv4.ip_local_port_range), which caps
//! connections to one server port. Spreading connections over 127.0.0.2..127.0.0.K lifts the cap.
//! `IP_BIND_ADDRESS_NO_PORT` defers the port choice to `connect`, so the kernel picks a port unique for the full
//! 4-tuple instead of reserving one per bind.

use crate::proto::SlowSockets;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

/// `IP_BIND_ADDRESS_NO_PORT` from linux/in.h (libc does not export it for every target).
const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;

/// Starts a non-blocking connect to `server`, from `source` when given (port chosen at connect time). With
/// `slow`, the socket is a slow mobile reader's: a small receive buffer and segment size, set before connect
/// so the window and MSS it advertises are small from the start.
pub fn connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    slow: Option<&SlowSockets>,
) -> io::Result<mio::net::TcpStream> {
    let socket = Socket::new(
        Domain::for_address(server),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if let Some(slow) = slow {
        socket.set_recv_buffer_size(slow.receive_buffer)?;
        socket.set_mss(slow.mss)?;
    }
    // Pushes are small; Nagle would delay the pongs and close frames we send.
    socket.set_nodelay(true)?;
    if let Some(ip) = source {
        if ip.is_ipv4() {
            set_bind_address_no_port(&socket)?;
        }
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&server.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(mio::net::TcpStream::from_std(socket.into()))
}

fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its exact size, as setsockopt requires.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A short, stable name for why a socket operation failed, used as a report key.
pub fn reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ECONNRESET) | Some(libc::EPIPE) => "reset".into(),
        Some(libc::ETIMEDOUT) => "timeout".into(),
        Some(libc::EADDRNOTAVAIL) => "no_source_port".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "out_of_descriptors".into(),
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => "unreachable".into(),
        Some(code) => format!("errno_{code}"),
        None => format!("{:?}", e.kind()).to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_named() {
        let e = |code| io::Error::from_raw_os_error(code);
        assert_eq!(reason(&e(libc::ECONNREFUSED)), "refused");
        assert_eq!(reason(&e(libc::EPIPE)), "reset");
        assert_eq!(reason(&e(libc::EADDRNOTAVAIL)), "no_source_port");
        assert_eq!(reason(&e(libc::EIO)), format!("errno_{}", libc::EIO));
    }

    #[test]
    fn connects_from_a_second_loopback_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let _stream = connect(server, Some("127.0.0.2".parse().unwrap()), None).unwrap();
        let (_, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
    }
}
