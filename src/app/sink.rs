//! Where a command's output lines go: the terminal of a one-shot command,
//! or, line by line, the control socket of a command the daemon runs for
//! a client. Either way a line is escaped once it reaches a terminal
//! (`crate::text`).

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::text::escape_control;

/// One line of the daemon's answer on its control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    /// A line for standard output.
    Out(String),
    /// A line for standard error.
    Err(String),
    /// The command's exit code; the last line.
    Exit(u8),
}

/// The terminal, or a client's socket.
#[derive(Debug, Clone)]
pub(crate) enum Sink {
    Terminal,
    Socket(mpsc::UnboundedSender<Reply>),
}

impl Sink {
    pub(crate) fn out(&self, line: &str) {
        match self {
            Sink::Terminal => write_stdout(line),
            Sink::Socket(tx) => {
                // A client gone away does not stop the work.
                let _ = tx.send(Reply::Out(line.to_owned()));
            }
        }
    }

    pub(crate) fn err(&self, line: &str) {
        match self {
            Sink::Terminal => eprintln!("{}", escape_control(line)),
            Sink::Socket(tx) => {
                let _ = tx.send(Reply::Err(line.to_owned()));
            }
        }
    }
}

/// One line to standard output, escaped.
pub(crate) fn write_stdout(line: &str) {
    write_stdout_all(&format!("{}\n", escape_control(line)));
}

/// Writes `text` to stdout in one go. A closed pipe (`certd status | head`)
/// ends the process quietly, as it does for other Unix tools.
pub(crate) fn write_stdout_all(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}
