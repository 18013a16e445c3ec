#include "lib/mime.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <gmime/gmime.h>

#include "lib/xmalloc.h"

/* Fields the APIs carry themselves: never custom headers. */
static const char *const mime_fields[] = {
    "from", "to", "cc", "bcc", "subject", "reply-to", "mime-version",
};

/* Fields that cannot be carried: the API adds its own trace, signs with
 * its own DKIM key and sets Date and Sender; a signature over the
 * original bytes would not verify after the API rebuilt the message. */
static const char *const mime_not_carried[] = {
    "received", "return-path", "dkim-signature", "domainkey-signature", "x-google-dkim-signature",
    "arc-seal", "arc-message-signature", "arc-authentication-results",
    "authentication-results", "received-spf", "sender", "date", "x-sg-id", "x-sg-eid",
};

static int mime_in(const char *name, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strcasecmp(name, list[i]) == 0)
            return 1;
    return 0;
}

/* A copy of s that is valid UTF-8 (g_utf8_make_valid replaces bad
 * sequences with U+FFFD), allocated with xmalloc. */
static char *mime_utf8(const char *s, ssize_t len)
{
    gchar *v;
    char *out;

    if (s == NULL)
        return xstrdup("");
    if (g_utf8_validate(s, len, NULL))
        return len < 0 ? xstrdup(s) : xstrndup(s, (size_t)len);
    v = g_utf8_make_valid(s, len);
    out = xstrdup(v);
    g_free(v);
    return out;
}

/* A header value as one line: line breaks of folding removed (RFC 5322
 * section 2.2.3), leading and trailing blanks trimmed. */
static char *mime_unfold(const char *raw)
{
    size_t n = strlen(raw), o = 0, start = 0, end;
    char *tmp = xmalloc(n + 1), *out;

    for (size_t i = 0; i < n; i++)
        if (raw[i] != '\r' && raw[i] != '\n')
            tmp[o++] = raw[i];
    while (start < o && (tmp[start] == ' ' || tmp[start] == '\t'))
        start++;
    end = o;
    while (end > start && (tmp[end - 1] == ' ' || tmp[end - 1] == '\t'))
        end--;
    out = mime_utf8(tmp + start, (ssize_t)(end - start));
    free(tmp);
    return out;
}

static void mime_push_str(char ***v, size_t *n, const char *s)
{
    *v = xrealloc(*v, (*n + 1) * sizeof(**v));
    (*v)[(*n)++] = xstrdup(s);
}

/* Appends the mailboxes of list (groups flattened, RFC 5322 section
 * 3.4) to the address array. */
static void mime_addrs(InternetAddressList *list, char ***v, size_t *n)
{
    int len = list != NULL ? internet_address_list_length(list) : 0;

    for (int i = 0; i < len; i++) {
        InternetAddress *ia = internet_address_list_get_address(list, i);

        if (INTERNET_ADDRESS_IS_GROUP(ia)) {
            mime_addrs(internet_address_group_get_members(INTERNET_ADDRESS_GROUP(ia)), v, n);
        } else if (INTERNET_ADDRESS_IS_MAILBOX(ia)) {
            const char *a = internet_address_mailbox_get_addr(INTERNET_ADDRESS_MAILBOX(ia));

            if (a != NULL && a[0] != '\0')
                mime_push_str(v, n, a);
        }
    }
}

/* The first mailbox of a list, or 0. */
static int mime_first_mailbox(InternetAddressList *list, struct mime_mailbox *mb)
{
    int len = list != NULL ? internet_address_list_length(list) : 0;

    for (int i = 0; i < len; i++) {
        InternetAddress *ia = internet_address_list_get_address(list, i);

        if (INTERNET_ADDRESS_IS_GROUP(ia)) {
            if (mime_first_mailbox(internet_address_group_get_members(INTERNET_ADDRESS_GROUP(ia)),
                                   mb))
                return 1;
        } else if (INTERNET_ADDRESS_IS_MAILBOX(ia)) {
            const char *a = internet_address_mailbox_get_addr(INTERNET_ADDRESS_MAILBOX(ia));
            const char *name = internet_address_get_name(ia);

            if (a == NULL || a[0] == '\0')
                continue;
            mb->addr = mime_utf8(a, -1);
            mb->name = mime_utf8(name != NULL ? name : "", -1);
            return 1;
        }
    }
    return 0;
}

static void mime_reply_to(InternetAddressList *list, struct mime_parts *p)
{
    int len = list != NULL ? internet_address_list_length(list) : 0;

    for (int i = 0; i < len; i++) {
        InternetAddress *ia = internet_address_list_get_address(list, i);
        const char *a, *name;

        if (!INTERNET_ADDRESS_IS_MAILBOX(ia))
            continue;
        a = internet_address_mailbox_get_addr(INTERNET_ADDRESS_MAILBOX(ia));
        if (a == NULL || a[0] == '\0')
            continue;
        name = internet_address_get_name(ia);
        p->reply_to = xrealloc(p->reply_to, (p->nreply_to + 1) * sizeof(*p->reply_to));
        p->reply_to[p->nreply_to].addr = mime_utf8(a, -1);
        p->reply_to[p->nreply_to].name = mime_utf8(name != NULL ? name : "", -1);
        p->nreply_to++;
    }
}

static void mime_headers(GMimeObject *msg, struct mime_parts *p)
{
    GMimeHeaderList *hl = g_mime_object_get_header_list(msg);
    int count = hl != NULL ? g_mime_header_list_get_count(hl) : 0;

    for (int i = 0; i < count; i++) {
        GMimeHeader *h = g_mime_header_list_get_header_at(hl, i);
        const char *name = g_mime_header_get_name(h);
        const char *raw = g_mime_header_get_raw_value(h);
        int dup = 0;

        if (name == NULL || name[0] == '\0')
            continue;
        if (mime_in(name, mime_fields, sizeof(mime_fields) / sizeof(mime_fields[0])) ||
            strncasecmp(name, "content-", 8) == 0)
            continue;
        if (mime_in(name, mime_not_carried,
                    sizeof(mime_not_carried) / sizeof(mime_not_carried[0]))) {
            mime_push_str(&p->dropped, &p->ndropped, name);
            continue;
        }
        for (size_t j = 0; j < p->nheaders && !dup; j++)
            dup = strcasecmp(p->headers[j].name, name) == 0;
        if (dup) {
            mime_push_str(&p->dropped, &p->ndropped, name);
            continue;
        }
        p->headers = xrealloc(p->headers, (p->nheaders + 1) * sizeof(*p->headers));
        p->headers[p->nheaders].name = mime_utf8(name, -1);
        p->headers[p->nheaders].value = mime_unfold(raw != NULL ? raw : "");
        p->nheaders++;
    }
}

/* The decoded content of a leaf part (transfer encoding undone). */
static void mime_part_bytes(GMimePart *part, unsigned char **data, size_t *len)
{
    GMimeDataWrapper *w = g_mime_part_get_content(part);
    GMimeStream *ms;
    GByteArray *ba;

    *data = NULL;
    *len = 0;
    if (w == NULL) {
        *data = xmalloc(1);
        return;
    }
    ms = g_mime_stream_mem_new();
    g_mime_data_wrapper_write_to_stream(w, ms);
    ba = g_mime_stream_mem_get_byte_array(GMIME_STREAM_MEM(ms));
    *len = ba != NULL ? ba->len : 0;
    *data = xmalloc(*len + 1);
    if (*len > 0)
        memcpy(*data, ba->data, *len);
    g_object_unref(ms);
}

static const char *mime_ext(const char *type)
{
    if (strncmp(type, "image/", 6) == 0 && strlen(type) < 24 && strchr(type + 6, '/') == NULL &&
        strchr(type + 6, '+') == NULL)
        return type + 6;
    if (strcmp(type, "message/rfc822") == 0)
        return "eml";
    if (strcmp(type, "text/plain") == 0)
        return "txt";
    if (strcmp(type, "text/html") == 0)
        return "html";
    if (strcmp(type, "application/pdf") == 0)
        return "pdf";
    return "bin";
}

static char *mime_type_of(GMimeObject *obj)
{
    GMimeContentType *ct = g_mime_object_get_content_type(obj);
    const char *t = ct != NULL ? g_mime_content_type_get_media_type(ct) : NULL;
    const char *s = ct != NULL ? g_mime_content_type_get_media_subtype(ct) : NULL;
    char buf[256];

    snprintf(buf, sizeof(buf), "%s/%s", t != NULL ? t : "application",
             s != NULL ? s : "octet-stream");
    for (char *c = buf; *c != '\0'; c++)
        if (*c >= 'A' && *c <= 'Z')
            *c = (char)(*c - 'A' + 'a');
    return mime_utf8(buf, -1);
}

static struct mime_attachment *mime_new_att(struct mime_parts *p, GMimeObject *obj,
                                            const char *filename, int in_related)
{
    struct mime_attachment *a;
    const char *cid = g_mime_object_get_content_id(obj);
    const char *disp = g_mime_object_get_disposition(obj);
    char name[64];

    p->att = xrealloc(p->att, (p->natt + 1) * sizeof(*p->att));
    a = &p->att[p->natt++];
    memset(a, 0, sizeof(*a));
    a->content_type = mime_type_of(obj);
    if (filename != NULL && filename[0] != '\0') {
        a->filename = mime_utf8(filename, -1);
    } else {
        snprintf(name, sizeof(name), "attachment-%zu.%s", p->natt, mime_ext(a->content_type));
        a->filename = xstrdup(name);
    }
    if (cid != NULL && cid[0] != '\0') {
        a->content_id = mime_utf8(cid, -1);
        a->is_inline = in_related || (disp != NULL && strcasecmp(disp, "inline") == 0);
    }
    return a;
}

static void mime_walk(GMimeObject *obj, struct mime_parts *p, int in_related, int depth)
{
    GMimeContentType *ct = g_mime_object_get_content_type(obj);

    if (depth > 64)
        return;                               /* GMime caps nesting too */
    if (GMIME_IS_MULTIPART(obj)) {
        GMimeMultipart *mp = GMIME_MULTIPART(obj);
        int related = ct != NULL && g_mime_content_type_is_type(ct, "multipart", "related");
        int n = g_mime_multipart_get_count(mp);

        if (GMIME_IS_MULTIPART_SIGNED(obj) || GMIME_IS_MULTIPART_ENCRYPTED(obj) ||
            (ct != NULL && (g_mime_content_type_is_type(ct, "multipart", "signed") ||
                            g_mime_content_type_is_type(ct, "multipart", "encrypted"))))
            p->opaque = 1;
        for (int i = 0; i < n; i++)
            mime_walk(g_mime_multipart_get_part(mp, i), p, related, depth + 1);
        return;
    }
    if (GMIME_IS_MESSAGE_PART(obj)) {
        GMimeMessage *inner = g_mime_message_part_get_message(GMIME_MESSAGE_PART(obj));
        GMimeContentDisposition *cd = g_mime_object_get_content_disposition(obj);
        const char *fn = cd != NULL ? g_mime_content_disposition_get_parameter(cd, "filename")
                                    : NULL;
        struct mime_attachment *a = mime_new_att(p, obj, fn, in_related);
        GMimeStream *ms = g_mime_stream_mem_new();
        GMimeFormatOptions *fo = g_mime_format_options_new();
        GByteArray *ba;

        /* Stored messages have CRLF line ends (RFC 5322 section 2.1);
         * the attached message keeps them. */
        g_mime_format_options_set_newline_format(fo, GMIME_NEWLINE_FORMAT_DOS);
        if (inner != NULL)
            g_mime_object_write_to_stream(GMIME_OBJECT(inner), fo, ms);
        g_mime_format_options_free(fo);
        ba = g_mime_stream_mem_get_byte_array(GMIME_STREAM_MEM(ms));
        a->len = ba != NULL ? ba->len : 0;
        a->data = xmalloc(a->len + 1);
        if (a->len > 0)
            memcpy(a->data, ba->data, a->len);
        g_object_unref(ms);
        return;
    }
    if (GMIME_IS_PART(obj)) {
        GMimePart *part = GMIME_PART(obj);
        const char *fn = g_mime_part_get_filename(part);
        int attachment = g_mime_part_is_attachment(part) || (fn != NULL && fn[0] != '\0');
        struct mime_attachment *a;

        if (ct != NULL && g_mime_content_type_is_type(ct, "application", "pkcs7-mime"))
            p->opaque = 1;
        if (!attachment && GMIME_IS_TEXT_PART(obj) && ct != NULL) {
            int plain = g_mime_content_type_is_type(ct, "text", "plain");
            int html = g_mime_content_type_is_type(ct, "text", "html");

            if ((plain && p->text == NULL) || (html && p->html == NULL)) {
                char *t = g_mime_text_part_get_text(GMIME_TEXT_PART(obj));
                char *v = mime_utf8(t != NULL ? t : "", -1);

                g_free(t);
                if (plain)
                    p->text = v;
                else
                    p->html = v;
                return;
            }
        }
        a = mime_new_att(p, obj, fn, in_related);
        mime_part_bytes(part, &a->data, &a->len);
    }
}

static int mime_inited;

int mime_parse(const char *data, size_t len, struct mime_parts *out, char *err, size_t errlen)
{
    GMimeStream *stream;
    GMimeParser *parser;
    GMimeMessage *msg;
    GMimeObject *body;
    const char *subject;

    memset(out, 0, sizeof(*out));
    if (!mime_inited) {
        g_mime_init();
        mime_inited = 1;
    }
    stream = g_mime_stream_mem_new_with_buffer(data, len);
    parser = g_mime_parser_new_with_stream(stream);
    g_object_unref(stream);
    msg = g_mime_parser_construct_message(parser, NULL);
    g_object_unref(parser);
    if (msg == NULL) {
        snprintf(err, errlen, "not an Internet message (RFC 5322)");
        return -1;
    }
    if (!mime_first_mailbox(g_mime_message_get_from(msg), &out->from)) {
        out->from.addr = xstrdup("");
        out->from.name = xstrdup("");
    }
    mime_reply_to(g_mime_message_get_reply_to(msg), out);
    mime_addrs(g_mime_message_get_to(msg), &out->to, &out->nto);
    mime_addrs(g_mime_message_get_cc(msg), &out->cc, &out->ncc);
    subject = g_mime_message_get_subject(msg);
    if (subject != NULL)
        out->subject = mime_utf8(subject, -1);
    mime_headers(GMIME_OBJECT(msg), out);
    body = g_mime_message_get_mime_part(msg);
    if (body != NULL)
        mime_walk(body, out, 0, 0);
    g_object_unref(msg);
    return 0;
}

static void mime_strv_free(char **v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

void mime_parts_free(struct mime_parts *p)
{
    free(p->from.name);
    free(p->from.addr);
    for (size_t i = 0; i < p->nreply_to; i++) {
        free(p->reply_to[i].name);
        free(p->reply_to[i].addr);
    }
    free(p->reply_to);
    mime_strv_free(p->to, p->nto);
    mime_strv_free(p->cc, p->ncc);
    free(p->subject);
    free(p->text);
    free(p->html);
    for (size_t i = 0; i < p->nheaders; i++) {
        free(p->headers[i].name);
        free(p->headers[i].value);
    }
    free(p->headers);
    for (size_t i = 0; i < p->natt; i++) {
        free(p->att[i].filename);
        free(p->att[i].content_type);
        free(p->att[i].content_id);
        free(p->att[i].data);
    }
    free(p->att);
    mime_strv_free(p->dropped, p->ndropped);
    memset(p, 0, sizeof(*p));
}
