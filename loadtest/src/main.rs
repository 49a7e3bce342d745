//! `fanfare-loadtest`: the load generator operators use to size fanfare (or
//! Centrifugo) clusters. See README.md next to this crate.

mod client;
mod control;
mod fleet;
mod floor;
mod grpc_publish;
mod http_publish;
mod options;
mod procfs;
mod protobuf;
mod redis_stats;
mod report;
mod run;
mod track;
mod wire;
mod worker;
mod ws;

use std::process::ExitCode;

use clap::Parser;

use crate::options::Options;

fn main() -> ExitCode {
    // Hidden: `fanfare-loadtest worker` is a worker process of a coordinator.
    if std::env::args().nth(1).as_deref() == Some("worker") {
        return match worker::main_child() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fanfare-loadtest worker: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    // `fanfare-loadtest floor-server ADDR`: the calibration endpoint (floor.rs).
    if std::env::args().nth(1).as_deref() == Some("floor-server") {
        let args: Vec<String> = std::env::args().skip(2).collect();
        return match floor::main(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fanfare-loadtest: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let opts = Options::parse();
    let json = opts.json;
    let quiet = opts.quiet;
    let plan = match opts.merge_file().and_then(Options::resolve) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fanfare-loadtest: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fanfare-loadtest: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let command_line: Vec<String> = std::env::args().collect();
    match rt.block_on(run::run(plan, command_line, quiet)) {
        Ok(report) => {
            if json {
                eprint!("{}", report.table());
                println!("{}", serde_json::to_string_pretty(&report).expect("reports serialize"));
            } else {
                print!("{}", report.table());
            }
            if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("fanfare-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}
