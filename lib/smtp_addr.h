/*
 * smtp_addr: parsing of the MAIL and RCPT arguments (RFC 5321 section
 * 4.1.2 grammar, RFC 6531 SMTPUTF8, RFC 1870 SIZE, RFC 6152 8BITMIME).
 *
 * Pure functions; results are copied into fixed-size fields of the output
 * structs, so no pointer into the input survives the call.
 */
#ifndef MF_SMTP_ADDR_H
#define MF_SMTP_ADDR_H

#include <stddef.h>

/* RFC 5321 section 4.5.3.1: local part 64, domain 255, path 256 octets. */
#define SMTP_LOCAL_MAX 64
#define SMTP_DOMAIN_MAX 255
#define SMTP_PATH_MAX 256

struct smtp_path {
    /* The mailbox as "local@domain", with the source route (RFC 5321
     * section 4.1.2 A-d-l, accepted and ignored per appendix C) removed
     * and the local part kept exactly as sent (a quoted local part keeps
     * its quotes). Empty for the null reverse-path "<>". */
    char addr[SMTP_PATH_MAX + 1];
    size_t local_len;   /* bytes before the '@'; 0 for <> */
    /* Domain as sent (after '@'); address literals like "[192.0.2.1]" and
     * "[IPv6:...]" included. Points into addr. */
    const char *domain;
    int utf8;           /* holds non-ASCII octets (needs SMTPUTF8) */
    int postmaster;     /* the bare "<Postmaster>" recipient (no domain) */
};

enum smtp_body { SMTP_BODY_7BIT = 0, SMTP_BODY_8BITMIME };

struct smtp_mail_args {
    struct smtp_path path;
    long long size;       /* SIZE= value, -1 when absent */
    enum smtp_body body;  /* BODY= value */
    int smtputf8;         /* SMTPUTF8 parameter given */
};

enum smtp_addr_error {
    SMTP_ADDR_OK = 0,
    SMTP_ADDR_SYNTAX = -1,      /* not "FROM:<path>" / "TO:<path>" */
    SMTP_ADDR_BAD_MAILBOX = -2, /* the path does not parse as a mailbox */
    SMTP_ADDR_TOO_LONG = -3,    /* a part exceeds the RFC 5321 limits */
    SMTP_ADDR_BAD_PARAM = -4,   /* unknown or malformed ESMTP parameter */
    SMTP_ADDR_NEED_UTF8 = -5,   /* non-ASCII mailbox without SMTPUTF8 */
};

/*
 * Parses the argument of MAIL, starting at "FROM:" (case-insensitive; one
 * space after the colon is tolerated, as many clients send it). Accepts the
 * null path "<>". Known parameters: SIZE=<digits>, BODY=7BIT|8BITMIME,
 * SMTPUTF8, AUTH=<xtext> (accepted and ignored, RFC 4954 section 5). A
 * non-ASCII mailbox is only valid together with the SMTPUTF8 parameter.
 * On error returns a negative smtp_addr_error and sets *why to a short
 * static description fit for a reply text.
 */
int smtp_addr_parse_mail(const char *arg, size_t len, struct smtp_mail_args *out,
                         const char **why);

/*
 * Parses the argument of RCPT, starting at "TO:". The null path is refused;
 * "<Postmaster>" without a domain is accepted (RFC 5321 section 4.1.1.3) and
 * sets postmaster. No RCPT parameters are supported (DSN is not offered).
 * utf8_ok says whether the transaction was opened with SMTPUTF8.
 */
int smtp_addr_parse_rcpt(const char *arg, size_t len, int utf8_ok,
                         struct smtp_path *out, const char **why);

/* Returns 1 when domain (NUL-terminated) is a syntactically valid RFC 5321
 * Domain or address literal (UTF-8 labels allowed when utf8_ok), else 0. */
int smtp_addr_domain_valid(const char *domain, int utf8_ok);

#endif
