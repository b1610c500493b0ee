//! The progress line on stderr: connections open, attempt rate and errors, redrawn in place while a phase
//! runs. Silent unless stderr is a terminal (and `--quiet` is not given).
//!
//! It owns the latest progress snapshot of each worker and the line's text; it measures nothing.

use crate::proto::Event;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const REDRAW: Duration = Duration::from_millis(250);

/// Progress of the current phase.
pub struct Progress {
    enabled: bool,
    phase: &'static str,
    target: u64,
    started: Instant,
    last_draw: Option<Instant>,
    /// Latest (open, started, failed) per worker, and whether it came during this phase.
    snapshots: Vec<(u64, u64, u64)>,
    heard: Vec<bool>,
    /// Connections open when the phase began, shown until the workers report.
    known_open: u64,
    drawn: bool,
}

impl Progress {
    /// A progress line for `workers` workers; drawn only when `wanted` and stderr is a terminal.
    pub fn new(workers: usize, wanted: bool) -> Self {
        Progress {
            enabled: wanted && std::io::stderr().is_terminal(),
            phase: "",
            target: 0,
            started: Instant::now(),
            last_draw: None,
            snapshots: vec![(0, 0, 0); workers],
            heard: vec![false; workers],
            known_open: 0,
            drawn: false,
        }
    }

    /// A new phase begins with `open` connections; `target` is the connection count it aims at.
    pub fn phase(&mut self, phase: &'static str, target: u64, open: u64) {
        self.clear();
        self.phase = phase;
        self.target = target;
        self.known_open = open;
        self.started = Instant::now();
        self.snapshots.iter_mut().for_each(|s| *s = (0, 0, 0));
        self.heard.iter_mut().for_each(|h| *h = false);
    }

    /// Takes in a worker event (only `Progress` matters) or a tick, and redraws when due.
    pub fn update(&mut self, from: Option<(usize, &Event)>) {
        if let Some((
            worker,
            Event::Progress {
                open,
                started,
                failed,
            },
        )) = from
        {
            if let Some(s) = self.snapshots.get_mut(worker) {
                *s = (*open, *started, *failed);
                self.heard[worker] = true;
            }
        }
        if !self.enabled || self.last_draw.is_some_and(|t| t.elapsed() < REDRAW) {
            return;
        }
        self.last_draw = Some(Instant::now());
        let (mut open, started, failed) = self
            .snapshots
            .iter()
            .fold((0, 0, 0), |a, s| (a.0 + s.0, a.1 + s.1, a.2 + s.2));
        if !self.heard.iter().all(|h| *h) {
            // Some worker has not reported in this phase yet: the count from the phase start is better.
            open = open.max(self.known_open);
        }
        let secs = self.started.elapsed().as_secs_f64();
        // Too early for a meaningful rate below half a second.
        let rate = if secs >= 0.5 {
            started as f64 / secs
        } else {
            0.0
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K[{}] open {open}/{}  attempts {started} ({rate:.0}/s)  errors {failed}  {secs:.1}s",
            self.phase, self.target
        );
        let _ = err.flush();
        self.drawn = true;
    }

    /// Ends the line so later output starts clean.
    pub fn clear(&mut self) {
        if self.drawn {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
            self.drawn = false;
        }
        self.last_draw = None;
    }
}
