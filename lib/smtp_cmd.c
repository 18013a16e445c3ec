#include "lib/smtp_cmd.h"

#include <string.h>
#include <strings.h>

/* RFC 5321 section 4.1.1: verbs are at most a handful of letters; the header
 * allows 1..20 so that unknown extension verbs still parse as UNKNOWN. */
#define SMTP_VERB_MAX 20

/* Canonical names, indexed by enum smtp_cmd_id. */
static const char *const cmd_names[SMTP_CMD__COUNT] = {
    [SMTP_CMD_UNKNOWN] = "?",
    [SMTP_CMD_HELO] = "HELO",
    [SMTP_CMD_EHLO] = "EHLO",
    [SMTP_CMD_MAIL] = "MAIL",
    [SMTP_CMD_RCPT] = "RCPT",
    [SMTP_CMD_DATA] = "DATA",
    [SMTP_CMD_RSET] = "RSET",
    [SMTP_CMD_NOOP] = "NOOP",
    [SMTP_CMD_QUIT] = "QUIT",
    [SMTP_CMD_VRFY] = "VRFY",
    [SMTP_CMD_EXPN] = "EXPN",
    [SMTP_CMD_HELP] = "HELP",
    [SMTP_CMD_STARTTLS] = "STARTTLS",
    [SMTP_CMD_AUTH] = "AUTH",
    [SMTP_CMD_BDAT] = "BDAT",
};

/*
 * Only the two-octet sequence CRLF ends a line (RFC 5321 section 2.3.8). A
 * bare LF or CR stays inside the line so that smtp_cmd_parse() refuses it;
 * accepting either as a terminator is what makes SMTP smuggling possible.
 */
ssize_t smtp_cmd_frame(const char *p, size_t len, size_t max, size_t *linelen)
{
    size_t lim = len < max ? len : max;
    size_t i;

    /* A CRLF counts only when both of its octets lie within max. */
    for (i = 0; i + 1 < lim; i++) {
        const char *cr = memchr(p + i, '\r', lim - 1 - i);

        if (cr == NULL)
            break;
        i = (size_t)(cr - p);
        if (p[i + 1] == '\n') {
            *linelen = i;
            return (ssize_t)(i + 2);
        }
    }
    if (len >= max)
        return SMTP_FRAME_TOO_LONG;
    return SMTP_FRAME_NEED_MORE;
}

/*
 * The discarding state is a single bit: whether the last byte handed over
 * was a CR. A CRLF split across two reads is thus still recognised, and a
 * LF not preceded by CR does not end the overlong line.
 */
size_t smtp_cmd_discard(const char *p, size_t len, int *pending_cr, int *done)
{
    size_t i;

    *done = 0;
    if (len == 0)
        return 0;
    if (*pending_cr && p[0] == '\n') {
        *pending_cr = 0;
        *done = 1;
        return 1;
    }
    for (i = 0; i + 1 < len; i++) {
        const char *cr = memchr(p + i, '\r', len - 1 - i);

        if (cr == NULL)
            break;
        i = (size_t)(cr - p);
        if (p[i + 1] == '\n') {
            *pending_cr = 0;
            *done = 1;
            return i + 2;
        }
    }
    *pending_cr = p[len - 1] == '\r';
    return len;
}

static int is_alpha(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}

/* Control characters per RFC 5234 CTL (%x00-1F / %x7F), TAB excepted. */
static int is_bad_ctl(unsigned char c)
{
    return (c < 0x20 && c != '\t') || c == 0x7f;
}

static int is_ws(char c)
{
    return c == ' ' || c == '\t';
}

/*
 * The verb is everything up to the first space; it must be 1..20 ASCII
 * letters (so "MAIL:" or "MAIL\tFROM" are refused rather than read as MAIL).
 * Octets >= 0x80 are left to the argument parsers, which accept them only
 * under SMTPUTF8 (RFC 6531).
 */
int smtp_cmd_parse(const char *line, size_t len, struct smtp_cmd *out)
{
    size_t i, vlen, start, end;
    int id;

    memset(out, 0, sizeof(*out));
    out->id = SMTP_CMD_UNKNOWN;
    for (i = 0; i < len; i++)
        if (is_bad_ctl((unsigned char)line[i]))
            return -1;

    for (vlen = 0; vlen < len && line[vlen] != ' '; vlen++)
        if (!is_alpha((unsigned char)line[vlen]))
            return -1;
    if (vlen == 0 || vlen > SMTP_VERB_MAX)
        return -1;

    out->verb = line;
    out->verblen = vlen;
    for (id = SMTP_CMD_UNKNOWN + 1; id < SMTP_CMD__COUNT; id++) {
        if (strlen(cmd_names[id]) == vlen && strncasecmp(cmd_names[id], line, vlen) == 0) {
            out->id = (enum smtp_cmd_id)id;
            break;
        }
    }

    start = vlen;
    while (start < len && is_ws(line[start]))
        start++;
    end = len;
    while (end > start && is_ws(line[end - 1]))
        end--;
    out->arg = line + start;
    out->arglen = end - start;
    return 0;
}

const char *smtp_cmd_name(enum smtp_cmd_id id)
{
    if ((int)id <= SMTP_CMD_UNKNOWN || id >= SMTP_CMD__COUNT)
        return cmd_names[SMTP_CMD_UNKNOWN];
    return cmd_names[id];
}
