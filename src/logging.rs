//! Where log lines go.
//!
//! - One-shot commands (`run`, `score`, `status`, `demo`, ...): stderr only.
//! - `evald serve`: daily rolling files in `log_dir` (`evald.YYYY-MM-DD.log`, UTC days,
//!   `log_keep_days` kept, `evald.log` a symlink to today's) written by a non-blocking
//!   but **non-lossy** writer (a full buffer slows logging down instead of dropping
//!   lines), plus stderr for journald. Text by default, one JSON object per line with
//!   `daemon.log_format = "json"` (both sinks).
//!
//! The filter comes from `EVALD_LOG` (`info` by default, e.g. `EVALD_LOG=evald=debug`).
//! The returned [`LogGuard`] flushes the file on drop: hold it until the very end.

use std::io::IsTerminal;
use std::path::PathBuf;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::{DaemonSettings, LogFormat};

/// File name prefix of the daily files (`evald.2026-11-27.log`).
pub const FILE_PREFIX: &str = "evald";
/// Symlink to the current file (what `tail -F` follows).
pub const LATEST: &str = "evald.log";

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The log folder cannot be created or written.
    #[error("{path}: cannot write log files: {message}")]
    Dir {
        /// The folder.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A global logger was already installed.
    #[error("logging was already initialised")]
    AlreadySet,
}

/// Keeps the file writer alive; dropping it flushes every buffered line.
#[must_use = "dropping the guard stops file logging"]
pub struct LogGuard {
    file: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl LogGuard {
    /// Flush and close the log file now (before a process exit that skips destructors).
    pub fn flush(&mut self) {
        self.file.take();
    }
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_env("EVALD_LOG").unwrap_or_else(|_| EnvFilter::new("info"))
}

/// stderr for one-shot commands (coloured on a terminal).
pub fn init_cli() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter())
        .try_init();
}

/// Rolling files in `log_dir` plus stderr, for `evald serve`.
///
/// # Errors
/// [`LoggingError`] when the folder cannot be created or the appender cannot start.
pub fn init_daemon(d: &DaemonSettings) -> Result<LogGuard, LoggingError> {
    let dir_err = |message: String| LoggingError::Dir {
        path: d.log_dir.clone(),
        message,
    };
    // tracing-appender prints to stderr when the folder is missing; create it first.
    std::fs::create_dir_all(&d.log_dir).map_err(|e| dir_err(e.to_string()))?;
    let appender = tracing_appender::rolling::RollingFileAppender::builder()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix(FILE_PREFIX)
        .filename_suffix("log")
        .max_log_files(d.log_keep_days.max(1))
        .latest_symlink(LATEST)
        .build(&d.log_dir)
        .map_err(|e| dir_err(e.to_string()))?;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("evald-log")
        .finish(appender);
    // Under systemd, journald stamps every line itself.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !journald && std::io::stderr().is_terminal();
    let (file_layer, stderr_layer) = match d.log_format {
        LogFormat::Text => (
            fmt::layer().with_writer(writer).with_ansi(false).boxed(),
            if journald {
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .without_time()
                    .boxed()
            } else {
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .boxed()
            },
        ),
        LogFormat::Json => (
            fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_writer(writer)
                .boxed(),
            fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_writer(std::io::stderr)
                .boxed(),
        ),
    };
    tracing_subscriber::registry()
        .with(filter())
        .with(file_layer)
        .with(stderr_layer)
        .try_init()
        .map_err(|_| LoggingError::AlreadySet)?;
    Ok(LogGuard { file: Some(guard) })
}
