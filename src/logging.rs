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
//!
//! One event is one line, always: vendors name their folders, and a folder name holding a
//! newline and a fake "submission mailed" line must not become a second log line. Text
//! sinks pass through [`OneLine`], which escapes every control character of an event
//! (`\n`, `\r`, `\x1b`, ...) but its final newline; [`printable`] does the same for
//! what `evald status` prints. (The JSON format quotes strings already.)

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

/// `s` with control characters written as escapes (`\n`, `\r`, `\t`, `\x1b`), so that a
/// name chosen by a vendor prints as one line and cannot carry terminal sequences.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// At most `max` characters of `s`, saying how many were left out: messages a vendor
/// controls (a model's exception, a manifest's parse error quoting its line) are quoted
/// back into logs, the store, reports and `REJECTED.txt`, never amplified.
pub fn bounded(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => std::borrow::Cow::Borrowed(s),
        Some((cut, _)) => std::borrow::Cow::Owned(format!(
            "{} [... {} more characters]",
            &s[..cut],
            s[cut..].chars().count()
        )),
    }
}

/// Longest vendor-controlled message evald quotes back (characters).
pub const MAX_QUOTED: usize = 2000;

/// A writer for text log sinks that keeps one event on one line (see the module doc).
/// The formatter writes each event with one `write_all` of the whole line.
#[derive(Debug, Clone)]
pub struct OneLine<M> {
    inner: M,
    /// Keep ESC for colours (a terminal; tracing already escapes it in field values).
    keep_esc: bool,
}

impl<M> OneLine<M> {
    /// Wrap a writer maker; `keep_esc` for a coloured terminal sink.
    pub fn new(inner: M, keep_esc: bool) -> Self {
        OneLine { inner, keep_esc }
    }
}

/// The writer [`OneLine`] makes.
#[derive(Debug)]
pub struct OneLineWriter<W> {
    inner: W,
    keep_esc: bool,
}

impl<W: std::io::Write> std::io::Write for OneLineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, end) = match buf.split_last() {
            Some((b'\n', body)) => (body, &b"\n"[..]),
            _ => (buf, &b""[..]),
        };
        let bad = |b: u8| (b < 0x20 && !(self.keep_esc && b == 0x1b)) || b == 0x7f;
        if !body.iter().any(|&b| bad(b)) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.push(b'\t'),
                b if bad(b) => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
                b => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<'a, M: fmt::MakeWriter<'a>> fmt::MakeWriter<'a> for OneLine<M> {
    type Writer = OneLineWriter<M::Writer>;
    fn make_writer(&'a self) -> Self::Writer {
        OneLineWriter {
            inner: self.inner.make_writer(),
            keep_esc: self.keep_esc,
        }
    }
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
    let ansi = std::io::stderr().is_terminal();
    let _ = tracing_subscriber::fmt()
        .with_writer(OneLine::new(std::io::stderr, ansi))
        .with_ansi(ansi)
        .with_env_filter(filter())
        .try_init();
}

/// A worker's stderr: one JSON object per event, no timestamp (the supervisor parses it
/// with [`WorkerRecord::parse`] and logs it once, at its level, with its own time).
pub fn init_worker() {
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .without_time()
        .with_writer(std::io::stderr)
        .with_env_filter(filter())
        .try_init();
}

/// One line a worker wrote to stderr: its own log record, or anything else (libtorch and
/// CUDA print plain text).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    /// The record's level (`INFO` for plain text).
    pub level: tracing::Level,
    /// The message, with the record's other fields appended as `key=value`.
    pub text: String,
}

impl WorkerRecord {
    /// Read a line: a JSON record from [`init_worker`], or plain text.
    pub fn parse(line: &str) -> WorkerRecord {
        let plain = || WorkerRecord {
            level: tracing::Level::INFO,
            text: line.to_string(),
        };
        let Ok(serde_json::Value::Object(mut m)) = serde_json::from_str(line) else {
            return plain();
        };
        let level = match m.remove("level").as_ref().and_then(|v| v.as_str()) {
            Some("ERROR") => tracing::Level::ERROR,
            Some("WARN") => tracing::Level::WARN,
            Some("INFO") => tracing::Level::INFO,
            Some("DEBUG") => tracing::Level::DEBUG,
            Some("TRACE") => tracing::Level::TRACE,
            _ => return plain(),
        };
        // The supervisor names the worker (slot, pid) itself.
        for k in ["target", "slot", "pid"] {
            m.remove(k);
        }
        let mut text = match m.remove("message") {
            Some(serde_json::Value::String(s)) => s,
            Some(v) => v.to_string(),
            None => String::new(),
        };
        for (k, v) in m {
            let v = match v {
                serde_json::Value::String(s) => s,
                v => v.to_string(),
            };
            text.push_str(&format!(" {k}={v}"));
        }
        WorkerRecord { level, text }
    }
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
            fmt::layer()
                .with_writer(OneLine::new(writer, false))
                .with_ansi(false)
                .boxed(),
            if journald {
                fmt::layer()
                    .with_writer(OneLine::new(std::io::stderr, false))
                    .with_ansi(false)
                    .without_time()
                    .boxed()
            } else {
                fmt::layer()
                    .with_writer(OneLine::new(std::io::stderr, ansi))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn through(line: &[u8], keep_esc: bool) -> Vec<u8> {
        let mut w = OneLineWriter {
            inner: Vec::new(),
            keep_esc,
        };
        w.write_all(line).unwrap();
        w.inner
    }

    #[test]
    fn an_event_stays_one_line_whatever_its_fields_hold() {
        let forged = b"INFO submission seen name=x\nINFO submission mailed id=999\n";
        let out = through(forged, false);
        assert_eq!(
            out,
            b"INFO submission seen name=x\\nINFO submission mailed id=999\n".to_vec()
        );
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(
            through(b"a\rb\x1b[31mc\x07\n", false),
            b"a\\rb\\x1b[31mc\\x07\n".to_vec()
        );
        // A coloured terminal keeps its escape sequences, not the vendor's newlines.
        assert_eq!(
            through(b"\x1b[32mok\x1b[0m x\ny\n", true),
            b"\x1b[32mok\x1b[0m x\\ny\n".to_vec()
        );
        assert_eq!(through(b"plain line\n", false), b"plain line\n".to_vec());
    }

    #[test]
    fn a_worker_record_is_logged_once_with_its_level_and_fields() {
        let r = WorkerRecord::parse(
            r#"{"level":"WARN","message":"case failed: boom","case":"c1","target":"evald::worker"}"#,
        );
        assert_eq!(r.level, tracing::Level::WARN);
        assert_eq!(r.text, "case failed: boom case=c1");
        let p = WorkerRecord::parse("libtorch says hi {not json");
        assert_eq!(p.level, tracing::Level::INFO);
        assert_eq!(p.text, "libtorch says hi {not json");
        // JSON that is not a record stays text.
        assert_eq!(WorkerRecord::parse("[1,2]").text, "[1,2]");
    }

    #[test]
    fn bounded_cuts_long_messages_and_says_so() {
        assert_eq!(bounded("short", 10), "short");
        assert_eq!(bounded("ééééé", 5), "ééééé");
        assert_eq!(
            bounded(&"é".repeat(12), 10),
            format!("{} [... 2 more characters]", "é".repeat(10))
        );
    }

    #[test]
    fn printable_escapes_control_characters() {
        assert_eq!(printable("acme"), "acme");
        assert_eq!(
            printable("v1\nsubmission mailed id=999\x1b[2J"),
            "v1\\nsubmission mailed id=999\\x1b[2J"
        );
    }
}
