/*
 * mime: takes an Internet message (RFC 5322, MIME RFC 2045-2049) apart into
 * the fields of a JSON email API (SendGrid v3 mail/send, Postmark /email):
 * sender, visible recipients, subject, the text and HTML bodies,
 * attachments and the headers that can be carried as custom headers.
 * Parsing is GMime 3's; this module decides what goes where.
 *
 * The rules (docs/api.md lists them for operators):
 * - From: the first mailbox of the From field, display name decoded
 *   (RFC 2047) to UTF-8. Subject: decoded to UTF-8.
 * - Bodies: the first text/plain and the first text/html leaf that is not
 *   an attachment (no "Content-Disposition: attachment", no file name),
 *   outside any attached message, converted to UTF-8 from their charset.
 * - Attachments: every other leaf, and every attached message
 *   (message/rfc822) as one attachment; content decoded from its transfer
 *   encoding, byte for byte. A part with a Content-ID is inline when its
 *   disposition says inline or it sits in a multipart/related (RFC 2387).
 * - Headers: kept in order, unfolded (RFC 5322 section 2.2.3), except the
 *   fields the APIs carry themselves (From, To, Cc, Bcc, Subject,
 *   Reply-To) and the MIME structure the API rebuilds (MIME-Version,
 *   Content-*). Headers that cannot be carried are listed in dropped:
 *   trace and authentication fields (Received, Return-Path, DKIM-Signature,
 *   ARC-*, Authentication-Results, ...), Sender and Date (the API sets its
 *   own) and every repeated occurrence of a name (a JSON object holds one
 *   value per name). Message-ID is kept.
 * - opaque is set for a message whose meaning depends on its exact bytes:
 *   multipart/signed, multipart/encrypted (RFC 1847) or
 *   application/pkcs7-mime (S/MIME, RFC 8551). Rebuilding it breaks it.
 *
 * Every string is NUL-terminated valid UTF-8 (invalid sequences are
 * replaced with U+FFFD); attachment data is binary with its length.
 * GMime is initialised on first use; like the rest of the router, this
 * module is called from one thread.
 */
#ifndef MF_MIME_H
#define MF_MIME_H

#include <stddef.h>

struct mime_mailbox {
    char *name;                  /* display name, "" when none */
    char *addr;                  /* addr-spec, "" when there is none */
};

struct mime_header {
    char *name;                  /* as written */
    char *value;                 /* unfolded, trimmed, still RFC 2047 encoded */
};

struct mime_attachment {
    char *filename;              /* from the part, else "attachment-N.ext" */
    char *content_type;          /* "type/subtype", lower case */
    char *content_id;            /* without angle brackets; NULL when none */
    int is_inline;               /* Content-ID and inline or in multipart/related */
    unsigned char *data;         /* decoded content */
    size_t len;
};

struct mime_parts {
    struct mime_mailbox from;
    struct mime_mailbox *reply_to;
    size_t nreply_to;
    char **to, **cc;             /* addr-specs of the To and Cc fields (groups flattened) */
    size_t nto, ncc;
    char *subject;               /* NULL when the message has none */
    char *text, *html;           /* NULL when absent */
    struct mime_header *headers;
    size_t nheaders;
    struct mime_attachment *att;
    size_t natt;
    char **dropped;              /* names of headers not carried */
    size_t ndropped;
    int opaque;
};

/*
 * Parses len bytes of message (CRLF or LF line ends) into out, which the
 * caller releases with mime_parts_free() whatever the result. Returns 0,
 * or -1 with the reason in err when GMime cannot build a message at all.
 */
int mime_parse(const char *data, size_t len, struct mime_parts *out, char *err, size_t errlen);

void mime_parts_free(struct mime_parts *p);

#endif
