//! The summary email and its outbox, against a real SMTP server: aiosmtpd (PyPI), started on
//! loopback by these tests (`tests/it/smtp_sink.py`, installed by `scripts/test-deps.sh`).
//! Python's `email` package dissects what arrived, independently of lettre.
//!
//! Covered: subject, both bodies, the inline plot and the exact attachment bytes; AUTH with
//! the password read from its file; server down -> queued -> server up -> delivered exactly
//! once (across an outbox reopen, as after a restart); 4xx retried, 5xx not; the file
//! transport's `.eml`; the size cap; the HTML is well-formed and carries the numbers; the
//! change against the previous submission; `evald demo`'s `email:` line.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use evald::config::{MailSettings, MailTransport, SmtpSecurity};
use evald::mail::{self, Outbox, Outcome, Previous, RetryPolicy, State};
use evald::store::EvaluationResults;

use crate::report::{openkbp_eval, openkbp_predictions, write_both};
use crate::util::Demo;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sink_script() -> PathBuf {
    root().join("tests/it/smtp_sink.py")
}

/// A real SMTP server (aiosmtpd) on 127.0.0.1, killed on drop.
struct Sink {
    child: Child,
    dir: PathBuf,
}

impl Sink {
    /// `extra`: more `serve` options (`--user`, `--tls`, ... see smtp_sink.py).
    fn start(port: u16, dir: &Path, mode: &str, extra: &[&str]) -> Sink {
        let lib = root().join(".venv-test/aiosmtpd");
        assert!(
            lib.join("aiosmtpd").is_dir(),
            "aiosmtpd is not installed in {}: run scripts/test-deps.sh (`make test` does)",
            lib.display()
        );
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new("python3");
        cmd.arg(sink_script())
            .args([
                "serve",
                "--port",
                &port.to_string(),
                "--mode",
                mode,
                "--out",
            ])
            .arg(dir)
            .env("PYTHONPATH", &lib)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("sink.log")).unwrap());
        cmd.args(extra);
        let mut child = cmd.spawn().expect("start python3");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut sink = Sink {
            child,
            dir: dir.to_path_buf(),
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(l)) if l.starts_with("READY") => sink,
            other => {
                let _ = sink.child.kill();
                panic!(
                    "SMTP sink did not start ({other:?}): {}",
                    std::fs::read_to_string(dir.join("sink.log")).unwrap_or_default()
                )
            }
        }
    }

    /// Dissected messages received, in order.
    fn messages(&self) -> Vec<PathBuf> {
        let mut v: Vec<(u32, PathBuf)> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let n = e
                    .file_name()
                    .to_string_lossy()
                    .strip_prefix("msg-")?
                    .parse()
                    .ok()?;
                Some((n, e.path()))
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// DATA commands answered (accepted or not).
    fn attempts(&self) -> usize {
        std::fs::read_to_string(self.dir.join("attempts.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn smtp_settings(port: u16, dir: &Path, auth: Option<(String, PathBuf)>) -> MailSettings {
    smtp_settings_tls(port, dir, auth, SmtpSecurity::None, None)
}

fn smtp_settings_tls(
    port: u16,
    dir: &Path,
    auth: Option<(String, PathBuf)>,
    security: SmtpSecurity,
    ca_file: Option<PathBuf>,
) -> MailSettings {
    MailSettings {
        transport: MailTransport::Smtp {
            host: "127.0.0.1".into(),
            port,
            security,
            auth,
            ca_file,
            timeout: Duration::from_secs(10),
        },
        outbox_dir: dir.join("outbox"),
        from: "evald <evald@localhost>".into(),
        attach_max_bytes: 15 << 20,
    }
}

fn file_settings(dir: &Path) -> MailSettings {
    MailSettings {
        transport: MailTransport::File,
        outbox_dir: dir.join("outbox"),
        from: "evald <evald@localhost>".into(),
        attach_max_bytes: 15 << 20,
    }
}

fn recipients() -> Vec<String> {
    vec![
        "ai-eval@example.org".into(),
        "Radiology QA <qa@example.org>".into(),
    ]
}

/// A dissected message (see smtp_sink.py).
pub(crate) struct Msg {
    headers: serde_json::Value,
    pub(crate) text: String,
    pub(crate) html: String,
    structure: String,
    attachments: BTreeMap<String, Vec<u8>>,
    inline: BTreeMap<String, Vec<u8>>,
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
        })
        .unwrap_or_default()
}

fn read_msg(dir: &Path) -> Msg {
    let s = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
    Msg {
        headers: serde_json::from_str(&s("headers.json")).unwrap(),
        text: s("text.txt"),
        html: s("html.html"),
        structure: s("structure.txt"),
        attachments: files(&dir.join("attachments")),
        inline: files(&dir.join("inline")),
    }
}

/// Dissect an .eml with the same script (Python's email package).
pub(crate) fn parse_eml(eml: &Path, out: &Path) -> Msg {
    let st = Command::new("python3")
        .arg(sink_script())
        .arg("parse")
        .arg(eml)
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success());
    read_msg(out)
}

fn norm(s: &str) -> String {
    s.replace("\r\n", "\n").trim_end().to_string()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The real evaluation, its report on disk and its composed mail.
fn composed(
    dir: &Path,
    settings: &MailSettings,
) -> (evald::evaluation::Evaluation, PathBuf, mail::Composed) {
    let eval = openkbp_eval("v3", Some(&openkbp_predictions()));
    let (_, report) = write_both(&eval, dir);
    let m = mail::compose(&eval, &recipients(), None, Some(&report), settings).unwrap();
    (eval, report, m)
}

/// A composed message queued in a fresh outbox and tried once now.
struct FirstTry {
    outbox: Outbox,
    id: i64,
    at: chrono::DateTime<Utc>,
    done: Vec<mail::Delivery>,
    m: mail::Composed,
}

impl FirstTry {
    fn new(dir: &Path, settings: &MailSettings) -> Self {
        let (_, _, m) = composed(dir, settings);
        let outbox = Outbox::open(&dir.join("evald.db")).unwrap();
        let id = outbox.enqueue(&m.message, &m.label, None).unwrap();
        let at = Utc::now();
        let done = rt().block_on(outbox.deliver_due_at(settings, at)).unwrap();
        FirstTry {
            outbox,
            id,
            at,
            done,
            m,
        }
    }

    /// Try again two hours later (past any backoff) with `settings`.
    fn again(&self, settings: &MailSettings) -> Vec<mail::Delivery> {
        let later = self.at + chrono::Duration::hours(2);
        rt().block_on(self.outbox.deliver_due_at(settings, later))
            .unwrap()
    }
}

#[test]
fn email_arrives_over_smtp_with_subject_bodies_plot_and_exact_attachment() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let sink = Sink::start(port, &dir.path().join("sink"), "accept", &[]);
    let settings = smtp_settings(port, dir.path(), None);
    let (eval, report, m) = composed(dir.path(), &settings);
    let outbox = Outbox::open(&dir.path().join("state/evald.db")).unwrap();
    let id = outbox.enqueue(&m.message, &m.label, None).unwrap();
    assert_eq!(outbox.entry(id).unwrap().unwrap().state, State::Queued);
    let done = rt().block_on(outbox.deliver_due(&settings)).unwrap();
    assert_eq!(done.len(), 1);
    assert!(
        matches!(&done[0].outcome, Outcome::Sent(r) if r.contains("250")),
        "{done:?}"
    );
    let e = outbox.entry(id).unwrap().unwrap();
    assert_eq!((e.state, e.attempts), (State::Sent, 1));

    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1);
    let got = read_msg(&msgs[0]);
    let subject = got.headers["Subject"].as_str().unwrap();
    assert_eq!(subject, m.subject);
    // Label 9 is in no map, so nnU-Net's foreground mean is undefined; the headline
    // averages the classes that have a Dice.
    assert!(eval.summary.foreground_mean[&evald::metrics::aggregate::Metric::Dice].is_nan());
    let defined: Vec<f64> = eval
        .summary
        .per_class
        .values()
        .map(|m| m[&evald::metrics::aggregate::Metric::Dice].mean)
        .filter(|d| d.is_finite())
        .collect();
    assert_eq!(defined.len(), 7);
    let dice = defined.iter().sum::<f64>() / 7.0;
    assert!(
        subject.starts_with(&format!(
            "[evald] head-neck / acme / v3: Dice {dice:.3} (larynx "
        )),
        "{subject}"
    );
    assert!(subject.ends_with(", 10/11 cases"), "{subject}");
    assert_eq!(norm(&got.text), norm(&m.text));
    assert_eq!(norm(&got.html), norm(&m.html));
    assert_eq!(
        got.attachments["report.xlsx"],
        std::fs::read(&report).unwrap(),
        "attachment bytes"
    );
    assert_eq!(got.inline["dice-plot"], m.plot_png.clone().unwrap());
    assert!(got.html.contains("src=\"cid:dice-plot\""));
    let lines: Vec<&str> = got.structure.lines().collect();
    assert_eq!(lines[0], "multipart/mixed");
    assert_eq!(lines[1].trim(), "multipart/alternative");
    assert_eq!(lines[2].trim(), "text/plain");
    assert_eq!(lines[3].trim(), "multipart/related");
    assert_eq!(lines[4].trim(), "text/html");
    assert_eq!(lines[5].trim(), "image/png inline dice-plot");
    assert!(lines[6].trim().starts_with(
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet attachment report.xlsx"
    ));
    let env: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(msgs[0].join("envelope.json")).unwrap())
            .unwrap();
    assert_eq!(env["mail_from"], "evald@localhost");
    assert_eq!(
        env["rcpt_tos"],
        serde_json::json!(["ai-eval@example.org", "qa@example.org"])
    );
    // Nothing left to send: a second round sends nothing.
    assert!(rt()
        .block_on(outbox.deliver_due(&settings))
        .unwrap()
        .is_empty());
    assert_eq!(sink.attempts(), 1);
}

#[test]
fn smtp_auth_uses_the_password_file_read_at_send_time() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let sink = Sink::start(
        port,
        &dir.path().join("sink"),
        "accept",
        &["--user", "evald", "--password", "s3cret pass"],
    );
    let pw = dir.path().join("smtp-password");
    std::fs::write(&pw, "wrong\n").unwrap();
    let settings = smtp_settings(port, dir.path(), Some(("evald".into(), pw.clone())));
    // A refused login (535) is about our configuration, not the message: kept for retry.
    let first = FirstTry::new(dir.path(), &settings);
    let done = &first.done;
    assert!(
        matches!(&done[0].outcome, Outcome::Retry { error, .. } if error.contains("535")),
        "{done:?}"
    );
    assert!(
        !done[0].outcome_text().contains("wrong"),
        "the password is never in errors"
    );
    // The admin fixes the file; the next attempt reads it (no restart).
    std::fs::write(&pw, "s3cret pass\n").unwrap();
    let done = first.again(&settings);
    assert!(matches!(done[0].outcome, Outcome::Sent(_)), "{done:?}");
    assert_eq!(first.outbox.entry(first.id).unwrap().unwrap().attempts, 2);
    assert_eq!(sink.messages().len(), 1);
    let log = std::fs::read_to_string(sink.dir.join("auth.log")).unwrap();
    assert!(log.lines().last().unwrap().ends_with(" ok"), "{log}");
}

#[test]
fn starttls_and_implicit_tls_deliver_with_the_admins_ca_and_wait_without_it() {
    let tls = root().join("tests/data/tls");
    let (cert, key, ca) = (
        tls.join("server.pem"),
        tls.join("server.key"),
        tls.join("ca.pem"),
    );
    for (mode, security, expect) in [
        ("starttls", SmtpSecurity::StartTls, "STARTTLS"),
        ("implicit", SmtpSecurity::Tls, "TLS"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let sink = Sink::start(
            port,
            &dir.path().join("sink"),
            "accept",
            &[
                "--tls",
                mode,
                "--cert",
                cert.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
            ],
        );
        // The test CA is not a public root: without smtp_ca_file the server is not
        // trusted, and the message waits for the admin instead of going out in clear.
        let untrusted = smtp_settings_tls(port, dir.path(), None, security, None);
        let first = FirstTry::new(dir.path(), &untrusted);
        let done = &first.done;
        assert!(
            matches!(&done[0].outcome, Outcome::Retry { error, .. }
                if error.to_lowercase().contains("certificate")),
            "{expect}: {done:?}"
        );
        assert!(sink.messages().is_empty(), "{expect}");

        let trusted = smtp_settings_tls(port, dir.path(), None, security, Some(ca.clone()));
        let done = first.again(&trusted);
        assert!(
            matches!(done[0].outcome, Outcome::Sent(_)),
            "{expect}: {done:?}"
        );
        assert_eq!(
            first.outbox.entry(first.id).unwrap().unwrap().state,
            State::Sent
        );
        let msgs = sink.messages();
        assert_eq!(msgs.len(), 1, "{expect}");
        let envelope: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(msgs[0].join("envelope.json")).unwrap())
                .unwrap();
        let version = envelope["tls"].as_str().unwrap_or_default();
        assert!(
            version.starts_with("TLSv1.2") || version.starts_with("TLSv1.3"),
            "{expect}: the message came over {envelope}"
        );
        assert_eq!(
            read_msg(&msgs[0]).headers["Subject"],
            first.m.subject.as_str()
        );
    }
}

#[test]
fn a_plain_server_never_gets_the_message_when_starttls_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let sink = Sink::start(port, &dir.path().join("sink"), "accept", &[]);
    let ca = root().join("tests/data/tls/ca.pem");
    let settings = smtp_settings_tls(port, dir.path(), None, SmtpSecurity::StartTls, Some(ca));
    let first = FirstTry::new(dir.path(), &settings);
    assert!(
        matches!(&first.done[0].outcome, Outcome::Retry { error, .. }
            if error.to_lowercase().contains("tls")),
        "{:?}",
        first.done
    );
    let e = first.outbox.entry(first.id).unwrap().unwrap();
    assert_eq!(e.state, State::Queued);
    assert_eq!(sink.attempts(), 0, "no DATA in clear");
}

trait OutcomeText {
    fn outcome_text(&self) -> String;
}
impl OutcomeText for mail::Delivery {
    fn outcome_text(&self) -> String {
        format!("{:?}", self.outcome)
    }
}

#[test]
fn server_down_then_up_delivers_exactly_once_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(); // nothing listens there yet
    let settings = smtp_settings(port, dir.path(), None);
    let (_, _, m) = composed(dir.path(), &settings);
    let db = dir.path().join("state/evald.db");
    let now = Utc::now();
    let (id, other) = {
        let outbox = Outbox::open(&db).unwrap();
        let id = outbox.enqueue_at(&m.message, &m.label, None, now).unwrap();
        let other = outbox.enqueue_at(&m.message, "second", None, now).unwrap();
        let done = rt()
            .block_on(outbox.deliver_due_at(&settings, now))
            .unwrap();
        // Connection refused: the first is rescheduled, the second is not even tried (the
        // server is down for it too) but held back just as long.
        assert_eq!(done.len(), 1, "{done:?}");
        let Outcome::Retry { at, .. } = &done[0].outcome else {
            panic!("{done:?}")
        };
        assert_eq!(*at, now + chrono::Duration::seconds(30));
        let e = outbox.entry(id).unwrap().unwrap();
        assert_eq!((e.state, e.attempts), (State::Queued, 1));
        assert!(e.last_error.is_some());
        let o = outbox.entry(other).unwrap().unwrap();
        assert_eq!((o.state, o.attempts), (State::Queued, 0));
        assert_eq!(o.next_attempt_at, e.next_attempt_at);
        // Still down 40 s later: the second failure waits twice as long.
        let t1 = now + chrono::Duration::seconds(40);
        let done = rt().block_on(outbox.deliver_due_at(&settings, t1)).unwrap();
        let Outcome::Retry { at, .. } = &done[0].outcome else {
            panic!("{done:?}")
        };
        assert_eq!(*at, t1 + chrono::Duration::seconds(60));
        (id, other)
    }; // the outbox is dropped: a restart

    let sink = Sink::start(port, &dir.path().join("sink"), "accept", &[]);
    let outbox = Outbox::open(&db).unwrap();
    // Not due yet: nothing is sent before its time.
    let t2 = now + chrono::Duration::seconds(41);
    assert!(rt()
        .block_on(outbox.deliver_due_at(&settings, t2))
        .unwrap()
        .is_empty());
    let t3 = now + chrono::Duration::hours(1);
    let done = rt().block_on(outbox.deliver_due_at(&settings, t3)).unwrap();
    assert_eq!(done.len(), 2, "{done:?}");
    assert!(done.iter().all(|d| matches!(d.outcome, Outcome::Sent(_))));
    // The first was tried at each round (3), the second only once the server was up.
    for (i, n) in [(id, 3), (other, 1)] {
        let e = outbox.entry(i).unwrap().unwrap();
        assert_eq!((e.state, e.attempts), (State::Sent, n), "row {i}");
    }
    // Later rounds send nothing again.
    let t4 = now + chrono::Duration::days(5);
    assert!(rt()
        .block_on(outbox.deliver_due_at(&settings, t4))
        .unwrap()
        .is_empty());
    wait_for("2 messages", || sink.messages().len() == 2);
    assert_eq!(sink.attempts(), 2, "each message exactly once");
}

#[test]
fn a_4xx_reply_is_retried_and_a_5xx_reply_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let settings_for = |port| smtp_settings(port, dir.path(), None);
    let (_, _, m) = composed(dir.path(), &file_settings(dir.path()));
    let outbox = Outbox::open(&dir.path().join("evald.db")).unwrap();
    let now = Utc::now();

    let port = free_port();
    let busy = Sink::start(port, &dir.path().join("busy"), "tempfail", &[]);
    let id = outbox.enqueue_at(&m.message, &m.label, None, now).unwrap();
    let done = rt()
        .block_on(outbox.deliver_due_at(&settings_for(port), now))
        .unwrap();
    assert!(
        matches!(&done[0].outcome, Outcome::Retry { error, .. } if error.contains("451")),
        "{done:?}"
    );
    assert_eq!(outbox.entry(id).unwrap().unwrap().state, State::Queued);
    drop(busy);

    let port = free_port();
    let strict = Sink::start(port, &dir.path().join("strict"), "reject", &[]);
    let settings = settings_for(port);
    let later = now + chrono::Duration::hours(1);
    let done = rt()
        .block_on(outbox.deliver_due_at(&settings, later))
        .unwrap();
    assert!(
        matches!(&done[0].outcome, Outcome::Failed(e) if e.contains("550") && e.contains("refused by policy")),
        "{done:?}"
    );
    let e = outbox.entry(id).unwrap().unwrap();
    assert_eq!(e.state, State::Failed);
    assert!(
        e.last_error.unwrap().contains("5.7.1"),
        "the server's reply is kept"
    );
    // Never again, however late.
    for days in [1, 10, 100] {
        let t = now + chrono::Duration::days(days);
        assert!(rt()
            .block_on(outbox.deliver_due_at(&settings, t))
            .unwrap()
            .is_empty());
    }
    assert_eq!(strict.attempts(), 1);
    assert!(strict.messages().is_empty());
    // The admin can put it back.
    assert!(outbox.requeue(id).unwrap());
    assert_eq!(outbox.entry(id).unwrap().unwrap().state, State::Queued);
}

#[test]
fn an_unsent_message_is_given_up_after_the_policy_says() {
    let dir = tempfile::tempdir().unwrap();
    let settings = smtp_settings(free_port(), dir.path(), None);
    let (_, _, m) = composed(dir.path(), &settings);
    let policy = RetryPolicy {
        give_up_after: Duration::from_secs(3600),
        ..RetryPolicy::default()
    };
    let outbox = Outbox::open(&dir.path().join("evald.db"))
        .unwrap()
        .with_policy(policy);
    let now = Utc::now();
    let id = outbox.enqueue_at(&m.message, &m.label, None, now).unwrap();
    let done = rt()
        .block_on(outbox.deliver_due_at(&settings, now))
        .unwrap();
    assert!(matches!(done[0].outcome, Outcome::Retry { .. }));
    let t = now + chrono::Duration::hours(2);
    let done = rt().block_on(outbox.deliver_due_at(&settings, t)).unwrap();
    assert!(
        matches!(&done[0].outcome, Outcome::Failed(e) if e.starts_with("gave up after 2 attempts")),
        "{done:?}"
    );
    assert_eq!(outbox.entry(id).unwrap().unwrap().state, State::Failed);
}

#[test]
fn enqueue_with_a_key_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let settings = file_settings(dir.path());
    let (_, _, m) = composed(dir.path(), &settings);
    let outbox = Outbox::open(&dir.path().join("evald.db")).unwrap();
    let a = outbox
        .enqueue(&m.message, &m.label, Some("head-neck/acme/v3/abab"))
        .unwrap();
    let b = Outbox::open(&dir.path().join("evald.db"))
        .unwrap()
        .enqueue(&m.message, &m.label, Some("head-neck/acme/v3/abab"))
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(outbox.entries().unwrap().len(), 1);
    let by_key = outbox.entry_by_key("head-neck/acme/v3/abab").unwrap();
    assert_eq!(by_key.map(|e| e.id), Some(a));
    assert!(outbox.entry_by_key("head-neck/acme/v4").unwrap().is_none());
}

#[test]
fn file_transport_writes_one_eml_that_parses_back() {
    let dir = tempfile::tempdir().unwrap();
    let settings = file_settings(dir.path());
    let (_, report, m) = composed(dir.path(), &settings);
    let outbox = Outbox::open(&dir.path().join("evald.db")).unwrap();
    let id = outbox.enqueue(&m.message, &m.label, None).unwrap();
    let done = rt().block_on(outbox.deliver_due(&settings)).unwrap();
    let Outcome::Sent(path) = &done[0].outcome else {
        panic!("{done:?}")
    };
    let eml = PathBuf::from(path);
    assert_eq!(eml.parent().unwrap(), settings.outbox_dir);
    assert!(
        eml.file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with(&format!("-{id:06}-head-neck_acme_v3.eml")),
        "{}",
        eml.display()
    );
    assert_eq!(
        std::fs::read_dir(&settings.outbox_dir).unwrap().count(),
        1,
        "one file, no temporaries"
    );
    assert_eq!(
        std::fs::read(&eml).unwrap(),
        outbox.raw_message(id).unwrap().unwrap()
    );
    let got = parse_eml(&eml, &dir.path().join("parsed"));
    assert_eq!(got.headers["Subject"], m.subject.as_str());
    assert!(got.headers["Message-ID"].as_str().unwrap().starts_with('<'));
    assert_eq!(norm(&got.text), norm(&m.text));
    assert_eq!(
        got.attachments["report.xlsx"],
        std::fs::read(&report).unwrap()
    );
    assert!(rt()
        .block_on(outbox.deliver_due(&settings))
        .unwrap()
        .is_empty());
}

#[test]
fn a_report_over_the_cap_is_named_not_attached() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = file_settings(dir.path());
    settings.attach_max_bytes = 1000;
    let (_, report, m) = composed(dir.path(), &settings);
    assert!(
        matches!(m.report, mail::ReportInMail::TooLarge { .. }),
        "{:?}",
        m.report
    );
    let where_ = report.display().to_string();
    assert!(
        m.text.contains(&where_) && m.text.contains("not attached"),
        "{}",
        m.text
    );
    assert!(m.html.contains(&where_));
    let outbox = Outbox::open(&dir.path().join("evald.db")).unwrap();
    outbox.enqueue(&m.message, &m.label, None).unwrap();
    let done = rt().block_on(outbox.deliver_due(&settings)).unwrap();
    let Outcome::Sent(path) = &done[0].outcome else {
        panic!("{done:?}")
    };
    let got = parse_eml(Path::new(path), &dir.path().join("parsed"));
    assert!(got.attachments.is_empty());
    assert!(!got.structure.contains("spreadsheetml"));
}

/// The previous submission `v2`, as the store gives it: a perfect one (references scored
/// against themselves) on the same test set.
fn previous_v2() -> Previous {
    Previous::from_results("v2", &EvaluationResults::of(&openkbp_eval("v2", None)))
}

/// Check that `html` is well-formed XML: every element closed in order, only the five XML
/// entities or numeric references. Returns the text content.
fn well_formed_text(html: &str) -> String {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(html);
    r.config_mut().check_end_names = true;
    let mut depth = 0i32;
    let mut text = String::new();
    loop {
        match r
            .read_event()
            .unwrap_or_else(|e| panic!("HTML not well-formed at {}: {e}", r.buffer_position()))
        {
            Event::Start(_) => depth += 1,
            Event::End(_) => depth -= 1,
            Event::Text(t) => text.push_str(&t.decode().unwrap()),
            Event::GeneralRef(g) => {
                let name = g.decode().unwrap().into_owned();
                let c = match name.as_str() {
                    "amp" => '&',
                    "lt" => '<',
                    "gt" => '>',
                    "quot" => '"',
                    "apos" => '\'',
                    n => n
                        .strip_prefix("#x")
                        .map_or_else(|| n[1..].parse().ok(), |h| u32::from_str_radix(h, 16).ok())
                        .and_then(char::from_u32)
                        .unwrap_or_else(|| panic!("entity &{name}; is not XML")),
                };
                text.push(c);
            }
            Event::Eof => break,
            _ => {}
        }
        assert!(depth >= 0);
    }
    assert_eq!(depth, 0, "unclosed elements");
    text
}

#[test]
fn html_is_well_formed_and_carries_the_summary_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let settings = file_settings(dir.path());
    let eval = openkbp_eval("v3", Some(&openkbp_predictions()));
    let (json, report) = write_both(&eval, dir.path());
    // The previous submission: a perfect one (references scored against themselves).
    let prev = previous_v2();
    let m = mail::compose(&eval, &recipients(), Some(&prev), Some(&report), &settings).unwrap();
    let text = well_formed_text(&m.html);
    // Every class's mean Dice, as summary.json says, with 3 decimals ("n/a" when undefined).
    for (label, name) in crate::report::CLASSES {
        let d = &json["mean"][label.to_string()]["Dice"];
        let shown = d.as_f64().map_or("n/a".to_string(), |d| format!("{d:.3}"));
        assert!(text.contains(name), "{name}");
        assert!(
            m.text
                .lines()
                .any(|l| l.trim_start().starts_with(name) && l.contains(&shown)),
            "text: {name} {shown}\n{}",
            m.text
        );
        assert!(text.contains(&shown), "html: {name} {shown}");
    }
    let p = &json["evald"]["patient_level"];
    let sens = format!("{:.3}", p["sensitivity"].as_f64().unwrap());
    assert!(text.contains(&format!("Sensitivity {sens}")), "{text}");
    // The change against v2 (perfect): Dice fell, shown in red with a down arrow.
    assert!(text.contains("Change against v2"));
    let now = json["mean"]["1"]["Dice"].as_f64().unwrap();
    assert_eq!(
        prev.means[&1][&evald::metrics::aggregate::Metric::Dice],
        1.0
    );
    let delta = format!("{:+.3}", now - 1.0);
    assert!(
        m.html.contains(&format!("#cf222e;\">&#9660; {delta}")),
        "{delta}"
    );
    assert!(
        m.text.contains(&format!(
            "brainstem: Dice 1.000 -> {now:.3} ({delta}), IoU "
        )),
        "{}",
        m.text
    );
    // The failure is listed with its reason.
    assert!(text.contains("pt_999"));
    assert!(m.text.contains("Failed cases (1):"));
    // Data is escaped: a class name with markup cannot break the page.
    let mut odd = eval.clone();
    odd.spec.classes[0].name = "<b>brain & stem</b>".into();
    let m2 = mail::compose(&odd, &recipients(), None, None, &settings).unwrap();
    assert!(well_formed_text(&m2.html).contains("<b>brain & stem</b>"));
}

#[test]
fn compose_refuses_bad_addresses_and_missing_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let eval = openkbp_eval("v3", Some(&openkbp_predictions()));
    let settings = file_settings(dir.path());
    let e = mail::compose(&eval, &[], None, None, &settings).unwrap_err();
    assert!(e.to_string().contains("no recipient"), "{e}");
    let e = mail::compose(&eval, &["not an address".into()], None, None, &settings).unwrap_err();
    assert!(e.to_string().contains("'not an address'"), "{e}");
}

#[test]
fn demo_prints_an_email_line_whose_eml_carries_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::run(&dir.path().join("d"), 3, "48,48,12");
    let eml = demo.path("email");
    assert!(eml.is_file(), "{}", eml.display());
    let report = std::fs::read(demo.path("report")).unwrap();
    let got = parse_eml(&eml, &dir.path().join("parsed"));
    let subject = got.headers["Subject"].as_str().unwrap();
    assert!(
        subject.starts_with("[evald] thyroid-ca / demo-vendor / v1: Dice ")
            && subject.ends_with(", 3/3 cases"),
        "{subject}"
    );
    assert_eq!(got.headers["To"], "ai-eval@example.org");
    assert_eq!(got.attachments["report.xlsx"], report);
    assert!(got.inline.contains_key("dice-plot"));
    assert!(got.html.contains("thyroid") && got.text.contains("nodule"));
}

#[test]
fn the_plot_is_a_png_of_the_documented_size_with_every_class_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let settings = file_settings(dir.path());
    let (eval, report, m) = composed(dir.path(), &settings);
    let png = m.plot_png.clone().expect("plot drawn");
    let dec = png::Decoder::new(std::io::Cursor::new(&png));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), evald::plot::SIZE);
    // Each class with a defined Dice has its points in the picture: its colour at 75%
    // opacity over the white background.
    let px = info.line_size / info.width as usize;
    for (i, _) in eval.spec.classes.iter().enumerate().take(7) {
        let c = evald::plot::class_color(i);
        let want = [c.0, c.1, c.2].map(|v| (0.75 * f64::from(v) + 0.25 * 255.0) as i32);
        let found = buf[..info.buffer_size()]
            .chunks(px)
            .any(|p| (0..3).all(|k| (i32::from(p[k]) - want[k]).abs() <= 3));
        assert!(found, "class {i} not drawn");
    }
    // For a person to look at: EVALD_LOOK_DIR=/some/dir cargo test --test it the_plot
    if let Some(look) = std::env::var_os("EVALD_LOOK_DIR") {
        let look = PathBuf::from(look);
        std::fs::create_dir_all(&look).unwrap();
        // With a previous submission, as the team usually gets it.
        let prev = previous_v2();
        let m = mail::compose(&eval, &recipients(), Some(&prev), Some(&report), &settings).unwrap();
        std::fs::write(look.join("dice-plot.png"), &png).unwrap();
        std::fs::write(
            look.join("mail.html"),
            m.html.replace("cid:dice-plot", "dice-plot.png"),
        )
        .unwrap();
        std::fs::write(look.join("mail.txt"), &m.text).unwrap();
        std::fs::copy(&report, look.join("report.xlsx")).unwrap();
    }
}

#[test]
fn the_daemon_loop_delivers_retries_after_a_reload_and_stops_on_shutdown() {
    use std::sync::Arc;
    use tokio::sync::{watch, Notify};
    use tokio_util::sync::CancellationToken;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state/evald.db");
    // Start with an SMTP server that is down.
    let down = smtp_settings(free_port(), dir.path(), None);
    let (_, _, m) = composed(dir.path(), &down);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = watch::channel(down);
    let wake = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let task = rt.spawn(mail::run_outbox(
        Outbox::open(&db).unwrap(),
        rx,
        wake.clone(),
        stop.clone(),
        mail::outbox::POLL,
        |_: &mail::Delivery| {},
    ));
    // Another handle on the same database queues (as the pipeline would) and wakes it.
    let producer = Outbox::open(&db).unwrap();
    let id = producer.enqueue(&m.message, &m.label, Some("k1")).unwrap();
    wake.notify_one();
    // (attempts counts from the claim; the row is back to queued once the failure is in)
    wait_for("a failed first attempt", || {
        let e = producer.entry(id).unwrap().unwrap();
        e.attempts == 1 && e.state == State::Queued
    });
    let e = producer.entry(id).unwrap().unwrap();
    assert_eq!(e.state, State::Queued);
    assert!(e.next_attempt_at > Utc::now(), "backing off");
    // The admin switches to the file transport (SIGHUP): the held message goes at once,
    // not after its backoff.
    let file = file_settings(dir.path());
    tx.send(file.clone()).unwrap();
    wait_for("delivery after the reload", || {
        producer.entry(id).unwrap().unwrap().state == State::Sent
    });
    let e = producer.entry(id).unwrap().unwrap();
    assert_eq!(e.attempts, 2);
    assert!(Path::new(e.delivered_to.as_deref().unwrap()).is_file());
    stop.cancel();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the loop stops on shutdown")
            .unwrap()
            .unwrap();
    });
    assert_eq!(std::fs::read_dir(&file.outbox_dir).unwrap().count(), 1);
}
