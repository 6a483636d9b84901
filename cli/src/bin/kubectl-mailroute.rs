//! `kubectl mailroute ...`: the same commands as `mailroute`, found by kubectl as a plugin.

fn main() -> std::process::ExitCode {
    mailroute_cli::main_with(std::env::args_os())
}
