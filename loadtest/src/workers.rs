//! The coordinator's side of the worker processes: spawning them (the binary re-executed with the hidden
//! `worker` subcommand), sending commands, and collecting their events from one channel.
//!
//! It owns the child processes and pipes. It does not decide what to ask (the coordinator does).

use crate::proto::{Command, Event, WorkerInit};
use anyhow::{anyhow, bail, Context};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What arrives from the workers: an event, or the end of a worker's stdout.
pub enum Incoming {
    /// A parsed event from worker `.0`.
    Event(usize, Event),
    /// Worker `.0` closed its stdout (exited or crashed).
    Gone(usize),
}

/// The running workers.
pub struct Workers {
    children: Vec<Child>,
    pids: Vec<u32>,
    stdins: Vec<Option<ChildStdin>>,
    incoming: mpsc::Receiver<Incoming>,
    gone: Vec<bool>,
}

impl Workers {
    /// Starts one worker per `inits` entry and sends each its `Init`.
    pub fn spawn(inits: Vec<WorkerInit>) -> anyhow::Result<Workers> {
        let exe = std::env::current_exe().context("finding own executable")?;
        let (tx, rx) = mpsc::channel();
        let mut workers = Workers {
            children: Vec::new(),
            pids: Vec::new(),
            stdins: Vec::new(),
            incoming: rx,
            gone: vec![false; inits.len()],
        };
        for init in inits {
            let id = init.worker;
            let mut child = Process::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting worker {id}"))?;
            let stdout = child.stdout.take().expect("piped above");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Event>(&line) {
                        Ok(event) => {
                            if tx.send(Incoming::Event(id, event)).is_err() {
                                return;
                            }
                        }
                        Err(e) => eprintln!("worker {id}: unreadable event {line:?}: {e}"),
                    }
                }
                let _ = tx.send(Incoming::Gone(id));
            });
            workers.pids.push(child.id());
            workers.stdins.push(child.stdin.take());
            workers.children.push(child);
            workers.send(id, &Command::Init(init))?;
        }
        Ok(workers)
    }

    /// Process ids of the workers.
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Sends a command to one worker.
    pub fn send(&mut self, id: usize, cmd: &Command) -> anyhow::Result<()> {
        let stdin = self.stdins[id]
            .as_mut()
            .ok_or_else(|| anyhow!("worker {id} has no stdin"))?;
        let mut line = serde_json::to_vec(cmd)?;
        line.push(b'\n');
        stdin
            .write_all(&line)
            .and_then(|_| stdin.flush())
            .with_context(|| format!("writing to worker {id}"))
    }

    /// Sends the same command to every worker.
    pub fn send_all(&mut self, cmd: &Command) -> anyhow::Result<()> {
        for id in 0..self.len() {
            self.send(id, cmd)?;
        }
        Ok(())
    }

    /// Waits for one answer from every worker, taken out of its event by `pick`. Progress events go to
    /// `on_progress`, which is also called with `None` at least every 200 ms; other events (late answers to
    /// an abandoned phase) are skipped with a warning. Fails if a worker dies or reports a fatal error, or at
    /// `deadline`.
    pub fn collect<T>(
        &mut self,
        deadline: Instant,
        mut pick: impl FnMut(Event) -> Option<T>,
        mut on_progress: impl FnMut(Option<(usize, &Event)>),
    ) -> anyhow::Result<Vec<T>> {
        let mut answers: Vec<Option<T>> = (0..self.len()).map(|_| None).collect();
        while answers.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<usize> = answers
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| a.is_none())
                    .map(|(i, _)| i)
                    .collect();
                bail!("workers {missing:?} did not answer in time");
            }
            match self
                .incoming
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(Incoming::Event(id, Event::Fatal { message })) => {
                    bail!("worker {id}: {message}")
                }
                Ok(Incoming::Event(id, event @ Event::Progress { .. })) => {
                    on_progress(Some((id, &event)))
                }
                Ok(Incoming::Event(id, event)) => {
                    let what = format!("{event:?}");
                    let Some(answer) = pick(event) else {
                        // A late answer to a phase that was given up on; nothing waits for it any more.
                        eprintln!("densepush-loadtest: ignoring a stale event from worker {id}: {what:.120}");
                        continue;
                    };
                    if answers[id].is_some() {
                        bail!("worker {id} answered twice");
                    }
                    answers[id] = Some(answer);
                }
                Ok(Incoming::Gone(id)) => {
                    self.gone[id] = true;
                    if answers[id].is_none() {
                        bail!("worker {id} exited before answering");
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => on_progress(None),
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("all workers gone"),
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a.expect("all answered"))
            .collect())
    }

    /// Waits up to `grace` for the workers to exit, then kills the rest.
    pub fn reap(&mut self, grace: Duration) {
        self.stdins.iter_mut().for_each(|s| *s = None);
        let deadline = Instant::now() + grace;
        for child in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Closing stdin makes a worker exit; kill any that linger so none outlives the run.
        self.reap(Duration::from_secs(2));
    }
}
