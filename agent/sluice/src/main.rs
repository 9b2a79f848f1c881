//! `sluice`: the node agent (`sluice run`) and the operator's debugging CLI (`status`, `config`,
//! `clusters`, `policy`, `logs`, `log-level`, `validate`, `uninstall`).
#![forbid(unsafe_code)]

mod agent;
mod cli;
mod client;
mod ebpf;
mod run;
mod source;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("sluice: {err:#}");
            std::process::ExitCode::from(1)
        }
    }
}
