//! The `mailroute` binary; see the library for the commands.

fn main() -> std::process::ExitCode {
    mailroute_cli::main_with(std::env::args_os())
}
