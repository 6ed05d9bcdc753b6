//! The `certd` binary; everything lives in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    certd::cli::main()
}
