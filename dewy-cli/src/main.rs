//! The `dewy` binary. All logic lives in the library modules; `main` only
//! maps the outcome to an exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    dewy_cli::main()
}
