#!/usr/bin/env python3
"""A real SMTP server for evald's mail tests (aiosmtpd), and a MIME dissector.

    smtp_sink.py serve --port N --out DIR [--mode accept|tempfail|reject] [--user U --password P]
                       [--tls none|starttls|implicit --cert PEM --key PEM]
    smtp_sink.py parse FILE.eml OUTDIR

`serve` listens on 127.0.0.1:N, prints "READY <port>" once it accepts connections and runs
until killed. Every DATA attempt appends a line to DIR/attempts.log; an accepted message
is dissected into DIR/msg-<n>/ (written under a temporary name, then renamed, so a
reader never sees half a message). `--mode tempfail` answers 451, `--mode reject` 550.
With --user/--password the server offers AUTH (PLAIN, LOGIN) on the plain connection and
requires it before MAIL. `--tls starttls` offers STARTTLS and requires it before MAIL;
`--tls implicit` speaks TLS from the first byte (SMTPS); both with the given certificate.

A dissected message (also what `parse` writes) holds: raw.eml, envelope.json (serve only:
envelope, whether AUTH was used, the TLS version of the connection or null),
headers.json (Subject decoded, From, To, Message-ID), structure.txt (the MIME tree, one
part per line, indented), text.txt and html.html (the decoded bodies), attachments/<name>
and inline/<content-id> (decoded bytes).

Python's email package parses the message independently of the Rust code that wrote it.
"""

import argparse
import asyncio
import email
import email.policy
import json
import os
import sys
import threading


def dissect(raw: bytes, out: str) -> None:
    os.makedirs(os.path.join(out, "attachments"), exist_ok=True)
    os.makedirs(os.path.join(out, "inline"), exist_ok=True)
    with open(os.path.join(out, "raw.eml"), "wb") as f:
        f.write(raw)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    headers = {
        "Subject": str(msg["Subject"] or ""),
        "From": str(msg["From"] or ""),
        "To": str(msg["To"] or ""),
        "Message-ID": str(msg["Message-ID"] or ""),
        "MIME-Version": str(msg["MIME-Version"] or ""),
    }
    with open(os.path.join(out, "headers.json"), "w", encoding="utf-8") as f:
        json.dump(headers, f, ensure_ascii=False, indent=1)
    lines = []

    def walk(part, depth):
        ctype = part.get_content_type()
        disp = part.get_content_disposition() or ""
        cid = (part["Content-ID"] or "").strip("<>")
        name = part.get_filename() or ""
        lines.append("  " * depth + " ".join(x for x in [ctype, disp, cid, name] if x))
        if part.is_multipart():
            for p in part.iter_parts():
                walk(p, depth + 1)
            return
        payload = part.get_payload(decode=True) or b""
        if disp == "attachment":
            with open(os.path.join(out, "attachments", os.path.basename(name)), "wb") as f:
                f.write(payload)
        elif cid:
            with open(os.path.join(out, "inline", cid), "wb") as f:
                f.write(payload)
        elif ctype == "text/plain":
            with open(os.path.join(out, "text.txt"), "w", encoding="utf-8") as f:
                f.write(part.get_content())
        elif ctype == "text/html":
            with open(os.path.join(out, "html.html"), "w", encoding="utf-8") as f:
                f.write(part.get_content())

    walk(msg, 0)
    with open(os.path.join(out, "structure.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def tls_version(server):
    """The TLS version of the connection the message came on (None: plain text)."""
    ssl_object = server.transport.get_extra_info("ssl_object")
    return ssl_object.version() if ssl_object is not None else None


class Handler:
    def __init__(self, out: str, mode: str):
        self.out = out
        self.mode = mode
        self.count = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            with open(os.path.join(self.out, "attempts.log"), "a", encoding="utf-8") as f:
                f.write(f"{self.mode} {envelope.mail_from} {','.join(envelope.rcpt_tos)}\n")
            if self.mode == "tempfail":
                return "451 4.3.0 evald test sink: try again later"
            if self.mode == "reject":
                return "550 5.7.1 evald test sink: message refused by policy"
            self.count += 1
            final = os.path.join(self.out, f"msg-{self.count}")
            tmp = final + ".partial"
            dissect(envelope.original_content or envelope.content, tmp)
            with open(os.path.join(tmp, "envelope.json"), "w", encoding="utf-8") as f:
                json.dump(
                    {
                        "mail_from": envelope.mail_from,
                        "rcpt_tos": envelope.rcpt_tos,
                        "auth": getattr(session, "login_data", None) and True,
                        "tls": tls_version(server),
                    },
                    f,
                )
            os.rename(tmp, final)
        return "250 2.0.0 queued by evald test sink"


def serve(args) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    os.makedirs(args.out, exist_ok=True)
    kwargs = {}
    if args.user is not None:
        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login.decode() == args.user
                and auth_data.password.decode() == args.password
            )
            with open(os.path.join(args.out, "auth.log"), "a", encoding="utf-8") as f:
                f.write(f"{mechanism} {'ok' if ok else 'bad'}\n")
            # handled=False: aiosmtpd itself answers (235 or 535).
            return AuthResult(success=ok, handled=False)

        kwargs = {
            "authenticator": authenticator,
            "auth_require_tls": False,
            "auth_required": True,
        }
    if args.tls != "none":
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        if args.tls == "starttls":
            kwargs.update({"tls_context": ctx, "require_starttls": True})
        else:
            kwargs["ssl_context"] = ctx
    controller = Controller(
        Handler(args.out, args.mode),
        hostname="127.0.0.1",
        port=args.port,
        server_hostname="sink.evald.test",
        **kwargs,
    )
    controller.start()
    print(f"READY {controller.port}", flush=True)
    try:
        threading.Event().wait()
    finally:
        controller.stop()


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--mode", choices=["accept", "tempfail", "reject"], default="accept")
    s.add_argument("--user")
    s.add_argument("--password")
    s.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
    s.add_argument("--cert")
    s.add_argument("--key")
    q = sub.add_parser("parse")
    q.add_argument("eml")
    q.add_argument("out")
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args)
    else:
        with open(args.eml, "rb") as f:
            dissect(f.read(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
