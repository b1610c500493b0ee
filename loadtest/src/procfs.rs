//! Samples of the server process and the kernel from /proc: resident memory, CPU time, TCP socket memory and
//! slab memory.
//!
//! It owns the parsing of /proc text (pure functions, unit-tested) and the thin readers around it. It does not
//! decide when to sample or what the numbers mean per connection (the coordinator and `report` do).

use serde::Serialize;
use std::io;
use thiserror::Error;

/// A /proc file that does not say what we look for.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    /// The field is absent.
    #[error("{0} not found")]
    Missing(&'static str),
    /// The field is there but not a number.
    #[error("{0} is not a number")]
    NotNumber(&'static str),
}

/// Memory of one process, from /proc/PID/status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcessMemory {
    /// VmRSS: resident set size now, bytes.
    pub rss_bytes: u64,
    /// VmHWM: peak resident set size, bytes.
    pub hwm_bytes: u64,
}

/// Kernel-wide memory that grows with sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KernelMemory {
    /// /proc/net/sockstat `TCP: mem`, converted from pages to bytes: buffers charged to TCP sockets.
    pub tcp_mem_bytes: u64,
    /// /proc/net/sockstat `TCP: inuse`: TCP sockets in the network namespace.
    pub tcp_inuse: u64,
    /// /proc/meminfo `Slab`, bytes: kernel object caches (socket structs, inodes, dentries, epoll items).
    pub slab_bytes: u64,
}

/// `VmRSS` and `VmHWM` from the text of /proc/PID/status (values are in kB).
pub fn parse_status(text: &str) -> Result<ProcessMemory, ParseError> {
    Ok(ProcessMemory {
        rss_bytes: kb_field(text, "VmRSS:")? * 1024,
        hwm_bytes: kb_field(text, "VmHWM:")? * 1024,
    })
}

/// `Slab` from the text of /proc/meminfo, in bytes.
pub fn parse_meminfo_slab(text: &str) -> Result<u64, ParseError> {
    Ok(kb_field(text, "Slab:")? * 1024)
}

fn kb_field(text: &str, name: &'static str) -> Result<u64, ParseError> {
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .ok_or(ParseError::Missing(name))?;
    line[name.len()..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or(ParseError::NotNumber(name))
}

/// TCP `(inuse, mem pages)` from the text of /proc/net/sockstat
/// (`TCP: inuse 5 orphan 0 tw 2 alloc 6 mem 3`).
pub fn parse_sockstat_tcp(text: &str) -> Result<(u64, u64), ParseError> {
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .ok_or(ParseError::Missing("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let value = |key: &'static str| -> Result<u64, ParseError> {
        let at = words
            .iter()
            .position(|w| *w == key)
            .ok_or(ParseError::Missing(key))?;
        words
            .get(at + 1)
            .and_then(|v| v.parse().ok())
            .ok_or(ParseError::NotNumber(key))
    };
    Ok((value("inuse")?, value("mem")?))
}

/// `utime + stime` in clock ticks from the text of /proc/PID/stat (fields 14 and 15). The command name (field
/// 2) is in parentheses and may itself contain spaces and parentheses, so fields are counted after the last ')'.
pub fn parse_stat_cpu_ticks(text: &str) -> Result<u64, ParseError> {
    let close = text.rfind(')').ok_or(ParseError::Missing("comm"))?;
    // After ')' come field 3 (state) onwards; utime is field 14, i.e. index 11 here.
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let number = |i: usize, name: &'static str| -> Result<u64, ParseError> {
        fields
            .get(i)
            .ok_or(ParseError::Missing(name))?
            .parse()
            .map_err(|_| ParseError::NotNumber(name))
    };
    Ok(number(11, "utime")? + number(12, "stime")?)
}

fn read(path: &str) -> io::Result<String> {
    std::fs::read_to_string(path)
}

fn invalid(e: ParseError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads a process's memory.
pub fn process_memory(pid: u32) -> io::Result<ProcessMemory> {
    parse_status(&read(&format!("/proc/{pid}/status"))?).map_err(invalid)
}

/// Reads a process's CPU time (user + system, all threads) in nanoseconds.
pub fn process_cpu_ns(pid: u32) -> io::Result<u64> {
    let ticks = parse_stat_cpu_ticks(&read(&format!("/proc/{pid}/stat"))?).map_err(invalid)?;
    Ok(ticks.saturating_mul(1_000_000_000) / clock_ticks_per_sec())
}

/// Reads the kernel's socket and slab memory.
pub fn kernel_memory() -> io::Result<KernelMemory> {
    let (tcp_inuse, pages) = parse_sockstat_tcp(&read("/proc/net/sockstat")?).map_err(invalid)?;
    let slab_bytes = parse_meminfo_slab(&read("/proc/meminfo")?).map_err(invalid)?;
    Ok(KernelMemory {
        tcp_mem_bytes: pages.saturating_mul(page_size()),
        tcp_inuse,
        slab_bytes,
    })
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of /proc/PID/stat times.
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Bytes in a page (`sysconf(_SC_PAGESIZE)`), the unit of sockstat's `mem`.
pub fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str =
        "Name:\tdensepush\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t  123456 kB\n\
                          VmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t4\n";

    #[test]
    fn status_gives_rss_and_hwm_in_bytes() {
        assert_eq!(
            parse_status(STATUS),
            Ok(ProcessMemory {
                rss_bytes: 10_240 * 1024,
                hwm_bytes: 20_480 * 1024
            })
        );
    }

    #[test]
    fn status_without_rss_is_an_error() {
        // Kernel threads and zombies have no Vm lines.
        assert_eq!(
            parse_status("Name:\tkthreadd\nState:\tS\n"),
            Err(ParseError::Missing("VmRSS:"))
        );
    }

    #[test]
    fn status_with_garbage_value_is_an_error() {
        let text = "VmRSS:\tlots kB\nVmHWM:\t1 kB\n";
        assert_eq!(parse_status(text), Err(ParseError::NotNumber("VmRSS:")));
    }

    #[test]
    fn meminfo_slab_in_bytes() {
        let text =
            "MemTotal:       24000000 kB\nSlab:             270816 kB\nSReclaimable:     100 kB\n";
        assert_eq!(parse_meminfo_slab(text), Ok(270_816 * 1024));
    }

    #[test]
    fn sockstat_tcp_inuse_and_mem() {
        let text = "sockets: used 29524\nTCP: inuse 29511 orphan 0 tw 2 alloc 29512 mem 9569\nUDP: inuse 0 mem 7\n";
        assert_eq!(parse_sockstat_tcp(text), Ok((29_511, 9_569)));
    }

    #[test]
    fn sockstat_without_tcp_line_is_an_error() {
        assert_eq!(
            parse_sockstat_tcp("sockets: used 1\n"),
            Err(ParseError::Missing("TCP:"))
        );
    }

    #[test]
    fn stat_sums_utime_and_stime() {
        let text =
            "1234 (densepush) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_stat_cpu_ticks(text), Ok(325));
    }

    #[test]
    fn stat_command_with_spaces_and_parens_is_skipped() {
        let text = "77 (a (b) c) R 1 77 77 0 -1 0 0 0 0 0 9 1 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_stat_cpu_ticks(text), Ok(10));
    }

    #[test]
    fn truncated_stat_is_an_error() {
        assert_eq!(
            parse_stat_cpu_ticks("1 (x) S 1 2 3"),
            Err(ParseError::Missing("utime"))
        );
    }

    #[test]
    fn own_process_can_be_sampled() {
        let me = std::process::id();
        let mem = process_memory(me).unwrap();
        assert!(mem.rss_bytes > 0 && mem.hwm_bytes >= mem.rss_bytes);
        process_cpu_ns(me).unwrap();
    }
}
