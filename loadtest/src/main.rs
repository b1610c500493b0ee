//! `densepush-loadtest`: opens many WebSocket connections to a densepush server from a few event-driven worker
//! processes, runs the selected phases (connect, idle, broadcast, unicast, churn), checks every delivered
//! message, and reports memory, rates, latency and server CPU per delivery.
//!
//! Exit status: 0 when the report's `ok` is true, 1 when the run finished but a check failed (connections
//! missing, messages lost/duplicated/reordered, a phase incomplete or aborted), 2 on a usage or setup error.
//! See `report.rs` for every JSON field.

mod admin;
mod checker;
mod cli;
mod coordinator;
mod dial;
mod procfs;
mod progress;
mod proto;
mod publisher;
mod report;
mod rng;
mod session;
mod stats;
mod sys;
mod tls;
mod worker;
mod workers;
mod ws;

use clap::Parser;
use std::io::Write;

fn main() {
    let cli = cli::Cli::parse();
    if let Some(cli::Cmd::Worker) = cli.command {
        if let Err(e) = worker::run() {
            eprintln!("densepush-loadtest worker: {e:#}");
            std::process::exit(2);
        }
        return;
    }
    let args = cli.run;
    let report = match coordinator::run(&args) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("densepush-loadtest: {e:#}");
            std::process::exit(2);
        }
    };
    let json = serde_json::to_string_pretty(&report).expect("the report serializes");
    if let Some(path) = &args.json_file {
        if let Err(e) = std::fs::write(path, format!("{json}\n")) {
            eprintln!("densepush-loadtest: writing {}: {e}", path.display());
        }
    }
    let summary = report.summary();
    if args.json {
        eprint!("{summary}");
        println!("{json}");
    } else {
        print!("{summary}");
    }
    let _ = std::io::stdout().flush();
    std::process::exit(if report.ok { 0 } else { 1 });
}
