//! The `kiln` command line: parse, dispatch to a recipe, print the result, set the exit code.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Like other Unix tools, stop quietly when stdout is closed (`kiln ... | head`) instead of
    // panicking on the failed write: Rust ignores SIGPIPE by default.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Burn's CPU backend allocates every op's output afresh; keep large buffers in the heap for
    // reuse instead of paying page faults on fresh mappings each time (kiln_kernels::malloc).
    kiln::kernels::malloc::keep_large_buffers(true);
    // A misspelt instruction-set cap would otherwise be ignored and a benchmark would measure
    // another path than the one asked for.
    if let Err(reason) = kiln::kernels::isa::env_cap() {
        eprintln!("error: {reason}");
        return ExitCode::FAILURE;
    }
    let (cli, resolved) = match cli::parse(std::env::args_os().collect()) {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli::run(cli, resolved) {
        Ok(code) => code,
        Err(error) => {
            let status = cli::exit_status(&error);
            if status == 1 {
                eprintln!("error: {error}");
                for cause in error.chain().skip(1) {
                    eprintln!("  caused by: {cause}");
                }
            } else if let Some(stop) = error.chain().last() {
                // Stopped by a signal, on purpose: what was saved, and how to go on.
                eprintln!("kiln: {stop}");
            }
            ExitCode::from(status)
        }
    }
}
