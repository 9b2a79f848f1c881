//! `sluice`: the node agent (`sluice run`) and the operator's debugging CLI (`status`, `config`,
//! `clusters`, `policy`, `logs`, `log-level`, `validate`, `uninstall`).
#![deny(unsafe_code)]

mod admin_socket;
mod agent;
mod alloc;
mod cli;
mod client;
mod ebpf;
mod run;
mod show;
mod source;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    match cli::dispatch(args) {
        Ok(code) => code,
        // The reader of our output went away (`sluice tap | head`): nothing left to say.
        Err(err)
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("sluice: {err:#}");
            std::process::ExitCode::from(1)
        }
    }
}
