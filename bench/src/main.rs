//! spillway-bench: the load generator. See `BENCHMARKS.md` for the scenarios,
//! the commands and the figures.
//!
//! One coordinator process starts (or attaches to) the server, publishes, and
//! samples the server's RSS, CPU and kernel socket memory; readers live in
//! worker processes (this binary re-executed as `__worker`), so that their
//! number is not bounded by one process's open files.

mod cli;
mod fleet;
mod frame;
mod hist;
mod plan;
mod procfs;
mod publisher;
mod report;
mod run;
mod server;
mod services;
mod sys;
mod transport;
mod worker;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("__worker") {
        return worker::main();
    }
    let args = cli::Args::parse();
    let limits = match sys::raise_open_files_limit() {
        Ok(l) => {
            eprintln!("open files: soft limit {} -> {} (hard {})", l.soft_before, l.soft, l.hard);
            Some(l)
        }
        Err(e) => {
            eprintln!("warning: cannot raise the open-files limit: {e}");
            None
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run::run(args.clone(), limits));
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("spillway-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", report::human(&result));
    if let Some(out) = &args.out {
        match serde_json::to_string_pretty(&result) {
            Ok(text) => {
                if let Err(e) = std::fs::write(out, text) {
                    eprintln!("cannot write {}: {e}", out.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("result: {}", out.display());
            }
            Err(e) => eprintln!("cannot serialise the result: {e}"),
        }
    }
    let svg_path = args.svg.clone().or_else(|| args.out.as_ref().map(|o| o.with_extension("svg")));
    if let Some(path) = svg_path {
        if let Err(e) = std::fs::write(&path, report::svg(&result)) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("chart: {}", path.display());
    }
    ExitCode::SUCCESS
}
