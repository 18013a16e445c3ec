"""Checks a DSN made by router/dsn.c with Python's email package.

Usage: dsn_check.py DSN_FILE ORIGINAL_FILE SPEC_JSON_FILE

tests/unit/test_dsn.c writes the three files and runs this script; exit
status 0 means every check passed, otherwise the failures are printed on
stderr. The checks are an independent reading of RFC 6522 (multipart/report)
and RFC 3464 (message/delivery-status), done by a parser that mailferry does
not share:

  - the message parses without defects as multipart/report with
    report-type=delivery-status and exactly three parts: text/plain
    (us-ascii), message/delivery-status, and the returned original with the
    expected type;
  - the top-level fields are as dsn.h promises (From, To, Subject, Date,
    Message-ID, Auto-Submitted, MIME-Version);
  - the per-message and per-recipient groups of the delivery-status part
    carry the expected Reporting-MTA, Final-Recipient, Action, Status and,
    where the spec gives them, Remote-MTA and Diagnostic-Code (compared
    after unfolding and collapsing blanks);
  - the returned part's raw body equals the original's header section (or
    the whole original) with line ends made CRLF, computed here without
    looking at the C code's output; skipped when the spec says the
    original has lines over 998 octets, which dsn.c splits.

The spec is a JSON object: {"to", "reporting_mta", "queue_id",
"return_full", "part3_type", "exact_original", "rcpts": [{"final",
"action", "status", "remote"?, "diag"?}]}.
"""
import email
import email.policy
import json
import re
import sys


def normalize_lines(data):
    """Splits data at CRLF, bare LF or bare CR; returns the list of lines
    and whether the last line had a line end."""
    lines = re.split(rb"\r\n|\n|\r", data)
    ended = lines[-1] == b""
    if ended:
        lines.pop()
    return lines, ended


def expected_original(data, full):
    lines, _ = normalize_lines(data)
    out = []
    in_header = True
    for line in lines:
        if in_header and line == b"":
            if not full:
                break
            in_header = False
        out.append(line + b"\r\n")
    return b"".join(out)


def unfold(value):
    return re.sub(r"\s+", " ", str(value)).strip()


def main():
    raw = open(sys.argv[1], "rb").read()
    orig = open(sys.argv[2], "rb").read()
    spec = json.load(open(sys.argv[3], encoding="utf-8"))
    errors = []

    def check(cond, what):
        if not cond:
            errors.append(what)
        return cond

    msg = email.message_from_bytes(raw, policy=email.policy.default)
    for part in msg.walk():
        check(not part.defects, "defects in %s: %r" % (part.get_content_type(), part.defects))

    # Top level.
    check(msg.is_multipart(), "not multipart")
    check(msg.get_content_type() == "multipart/report",
          "content type %s" % msg.get_content_type())
    check(msg.get_param("report-type") == "delivery-status",
          "report-type %r" % msg.get_param("report-type"))
    host = spec["reporting_mta"]
    check(msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@" + host, "From %s" % msg["From"])
    check(msg["From"].addresses[0].display_name == "Mail Delivery System", "From display name")
    check(msg["To"].addresses[0].addr_spec == spec["to"], "To %s" % msg["To"])
    check(str(msg["Subject"]) == "Undelivered Mail Returned to Sender", "Subject")
    check(msg["Date"].datetime is not None and msg["Date"].datetime.utcoffset().total_seconds() == 0,
          "Date %s" % msg["Date"])
    check(re.fullmatch(r"<%s\.dsn\.\d+@%s>" % (re.escape(spec["queue_id"]), re.escape(host)),
                       str(msg["Message-ID"])) is not None, "Message-ID %s" % msg["Message-ID"])
    check(str(msg["Auto-Submitted"]) == "auto-replied", "Auto-Submitted")
    check(str(msg["MIME-Version"]) == "1.0", "MIME-Version")

    parts = msg.get_payload()
    if not check(isinstance(parts, list) and len(parts) == 3, "expected 3 parts"):
        report(errors)
    text, status, original = parts

    # Part 1.
    check(text.get_content_type() == "text/plain", "part 1 type %s" % text.get_content_type())
    check(text.get_content_charset() == "us-ascii", "part 1 charset")
    body = text.get_payload(decode=True)
    check(all(b < 0x80 for b in body), "part 1 not ASCII")

    # Part 2.
    check(status.get_content_type() == "message/delivery-status",
          "part 2 type %s" % status.get_content_type())
    groups = status.get_payload()
    if check(len(groups) == 1 + len(spec["rcpts"]),
             "expected %d groups, got %d" % (1 + len(spec["rcpts"]), len(groups))):
        check(str(groups[0]["Reporting-MTA"]) == "dns; " + host,
              "Reporting-MTA %s" % groups[0]["Reporting-MTA"])
        check(str(groups[0]["X-Mailferry-Queue-ID"]) == spec["queue_id"], "queue id")
        for g, want in zip(groups[1:], spec["rcpts"]):
            for field, key in (("Final-Recipient", "final"), ("Action", "action"),
                               ("Status", "status"), ("Remote-MTA", "remote"),
                               ("Diagnostic-Code", "diag")):
                if key in want:
                    got = g[field]
                    check(got is not None and unfold(got) == unfold(want[key]),
                          "%s: got %r, want %r" % (field, got and unfold(got), want[key]))
                elif key in ("remote", "diag") and want.get("no_" + key):
                    check(g[field] is None, "%s present" % field)

    # Part 3.
    check(original.get_content_type() == spec["part3_type"],
          "part 3 type %s, want %s" % (original.get_content_type(), spec["part3_type"]))
    boundary = msg.get_boundary().encode()
    check(raw.count(boundary) == 5, "boundary occurs %d times" % raw.count(boundary))
    segments = raw.split(b"\r\n--" + boundary)
    if check(len(segments) == 5 and segments[4] == b"--\r\n", "delimiters"):
        seg = segments[3]
        check(seg.startswith(b"\r\n"), "delimiter line end")
        head, sep, content = seg[2:].partition(b"\r\n\r\n")
        if not sep and seg[2:].startswith(b"\r\n"):
            content = seg[4:]
        if spec["exact_original"]:
            want = expected_original(orig, spec["return_full"])
            check(content == want, "part 3 content differs:\n%r\n%r" % (content[:300], want[:300]))
        if original.get_content_type() == "text/rfc822-headers":
            check(original.get_payload(decode=True) == content, "part 3 decoded payload")
    report(errors)


def report(errors):
    for e in errors:
        print("dsn_check: " + e, file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
