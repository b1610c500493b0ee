//! `sd_notify` without libsystemd: one datagram to `$NOTIFY_SOCKET`, so a `Type=notify` unit knows when the
//! server is ready and which process is its main one after a live upgrade (`MAINPID=`).
//!
//! It owns the datagram only; nothing here fails loudly, since outside systemd there is no socket to tell.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) to the service manager, if one is listening.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket: its name starts with a NUL byte instead of '@'.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = sent {
        log::debug!("sd_notify {state:?}: {e}");
    }
}

/// Tells the service manager that `pid` is the service's main process, and that it is ready.
pub fn notify_main_pid(pid: u32) {
    notify(&format!("MAINPID={pid}\nREADY=1"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notification_reaches_the_socket_named_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        // The variable is read per call; set it for this test only (no other test reads it).
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify_main_pid(1234);
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MAINPID=1234\nREADY=1");
    }
}
