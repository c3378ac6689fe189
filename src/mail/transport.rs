//! Handing one stored message to the configured transport, and classifying what went wrong:
//! - `file`: the message is written atomically (temp file + rename) as
//!   `<outbox_dir>/<name>.eml`; the name is fixed when the message is queued, so a retry
//!   rewrites the same file instead of adding a second one;
//! - `smtp`: lettre's tokio transport with `none | starttls | tls` (public roots plus the
//!   optional `smtp_ca_file`), optional AUTH with the password read from its file now (so a
//!   changed password or CA needs no restart; the password is never logged), and the
//!   configured per-command timeout.
//!
//! Errors are classified for the outbox: a 5xx reply is permanent (the server read the
//! message and refused it: retrying cannot help), a 4xx reply is transient for that message,
//! and anything before a reply (connection refused, timeout, TLS, DNS) means the server is
//! unreachable right now, which is transient for every queued message. Authentication
//! refusals (530/534/535/538) are 5xx but are about our configuration, not the message:
//! they are treated as "server unusable" so messages wait for the admin's fix instead of
//! being dropped.

use std::path::{Path, PathBuf};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::config::{MailSettings, MailTransport, SmtpSecurity};

/// How a failed send should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The server refused this message for good (5xx): do not retry.
    Permanent,
    /// The server deferred this message (4xx): retry it later.
    Transient,
    /// The server could not be used at all (down, timeout, TLS, auth, unwritable outbox
    /// folder): retry later, and do not try the other queued messages now either.
    Unavailable,
}

/// A send that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    /// What to do about it.
    pub kind: FailureKind,
    /// The server's reply or the local error, one line, without secrets.
    pub message: String,
    /// The SMTP reply code, when there was one.
    pub code: Option<u16>,
}

impl SendError {
    fn unavailable(message: String) -> Self {
        SendError {
            kind: FailureKind::Unavailable,
            message,
            code: None,
        }
    }
}

/// Classify a lettre SMTP error.
pub fn classify(e: &lettre::transport::smtp::Error) -> SendError {
    let code = e.status().map(u16::from);
    let mut message = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let t = s.to_string();
        if !message.contains(&t) {
            message.push_str(": ");
            message.push_str(&t);
        }
        src = s.source();
    }
    let message = message.replace(['\r', '\n'], " ");
    let kind = if matches!(code, Some(530 | 534 | 535 | 538)) {
        FailureKind::Unavailable
    } else if e.is_permanent() {
        FailureKind::Permanent
    } else if e.is_transient() {
        FailureKind::Transient
    } else {
        // Connection, network, timeout, TLS, malformed replies: nothing says the message is
        // at fault, and no public predicate separates these further (lettre 0.11).
        FailureKind::Unavailable
    };
    SendError {
        kind,
        message,
        code,
    }
}

/// A transport built from [`MailSettings`] for one delivery round.
pub(crate) enum Sender {
    File {
        dir: PathBuf,
    },
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        endpoint: String,
    },
}

impl Sender {
    /// Build the transport; for SMTP with AUTH this reads the password file.
    pub fn new(settings: &MailSettings) -> Result<Self, SendError> {
        match &settings.transport {
            MailTransport::File => Ok(Sender::File {
                dir: settings.outbox_dir.clone(),
            }),
            MailTransport::Smtp {
                host,
                port,
                security,
                auth,
                ca_file,
                timeout,
            } => {
                let extra_ca = ca_file.as_deref().map(read_ca).transpose()?;
                let tls = |h: &str| {
                    let mut p = TlsParameters::builder(h.to_string());
                    if let Some(ca) = &extra_ca {
                        p = p.add_root_certificate(ca.clone());
                    }
                    p.build()
                        .map_err(|e| SendError::unavailable(format!("TLS setup for {h}: {e}")))
                };
                let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.as_str())
                    .port(*port)
                    .timeout(Some(*timeout));
                b = match security {
                    SmtpSecurity::None => b.tls(Tls::None),
                    SmtpSecurity::StartTls => b.tls(Tls::Required(tls(host)?)),
                    SmtpSecurity::Tls => b.tls(Tls::Wrapper(tls(host)?)),
                };
                if let Some((user, file)) = auth {
                    b = b.credentials(Credentials::new(user.clone(), read_password(file)?));
                }
                Ok(Sender::Smtp {
                    transport: b.build(),
                    endpoint: format!("{host}:{port}"),
                })
            }
        }
    }

    /// Deliver one message; returns where it went (`.eml` path, or the server's reply).
    pub async fn send(
        &self,
        envelope: &Envelope,
        raw: &[u8],
        file_name: &str,
    ) -> Result<String, SendError> {
        match self {
            Sender::File { dir } => {
                let dir = dir.clone();
                let raw = raw.to_vec();
                let name = file_name.to_string();
                tokio::task::spawn_blocking(move || write_eml(&dir, &name, &raw))
                    .await
                    .map_err(|e| SendError::unavailable(format!("writing the .eml: {e}")))?
                    .map(|p| p.display().to_string())
            }
            Sender::Smtp {
                transport,
                endpoint,
            } => match transport.send_raw(envelope, raw).await {
                Ok(resp) => Ok(format!(
                    "smtp {endpoint}: {} {}",
                    resp.code(),
                    resp.message().collect::<Vec<_>>().join(" ")
                )),
                Err(e) => Err(classify(&e)),
            },
        }
    }
}

fn read_password(file: &Path) -> Result<String, SendError> {
    let s = std::fs::read_to_string(file).map_err(|e| {
        SendError::unavailable(format!("SMTP password file {}: {e}", file.display()))
    })?;
    Ok(s.trim_end_matches(['\r', '\n']).to_string())
}

/// The admin's extra CA certificates. An unreadable or certificate-less file makes the
/// server unusable until fixed (messages wait), like a wrong password.
fn read_ca(file: &Path) -> Result<Certificate, SendError> {
    let bad = |why: String| {
        SendError::unavailable(format!(
            "SMTP CA file {} (mail.smtp_ca_file): {why}",
            file.display()
        ))
    };
    let pem = std::fs::read(file).map_err(|e| bad(e.to_string()))?;
    // from_pem accepts a file without any certificate: say so instead of trusting nothing.
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(bad(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        ));
    }
    Certificate::from_pem(&pem).map_err(|e| bad(e.to_string()))
}

/// Write `<dir>/<name>` atomically; rewriting the same name replaces it (idempotent).
fn write_eml(dir: &Path, name: &str, raw: &[u8]) -> Result<PathBuf, SendError> {
    use std::io::Write;
    let fail = |what: &str, e: std::io::Error| {
        SendError::unavailable(format!("outbox folder {}: {what}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail("creating", e))?;
    let mut tmp =
        crate::files::output_temp_in(dir).map_err(|e| fail("creating a temporary file", e))?;
    tmp.write_all(raw).map_err(|e| fail("writing", e))?;
    tmp.as_file().sync_all().map_err(|e| fail("flushing", e))?;
    let path = dir.join(name);
    tmp.persist(&path).map_err(|e| fail("renaming", e.error))?;
    Ok(path)
}
