/*
 * dkim: DKIM signatures on accepted messages (RFC 6376), made at
 * acceptance time so that every route (relay, API, smarthost) carries the
 * same signature: rsa-sha256 with OpenDKIM's library, ed25519-sha256 (RFC
 * 8463) with OpenSSL, because Debian 12's libopendkim leaks memory on every
 * Ed25519 signature (dkim.c says more).
 *
 * Keys. A key set (struct dkim_keys) is loaded from [dkim] keys_dir (files
 * named <domain>.<selector>.rsa.key or <domain>.<selector>.ed25519.key)
 * and [dkim] key_table (lines "domain selector rsa|ed25519 path"). Each key
 * file is a PEM private key that must be a regular file not accessible by
 * group or others; RSA keys have at least 1024 bits (RFC 8301 section 3.2;
 * 2048 is what keygen makes). A set is immutable once loaded and reference
 * counted: the gateway swaps in a new set on SIGHUP while signatures in
 * progress keep the old one. References are taken and dropped on the
 * loop's thread; signing only reads a set and runs on worker threads.
 *
 * Signing. The signing domain (d=) is the domain of the first address of
 * the From: header field (DMARC alignment, RFC 7489 section 3.1), or the
 * nearest parent domain that has a key (relaxed alignment); when neither
 * has one, the envelope sender's domain (and its parents); when none has a
 * key the message is not signed (logged). Every key of that domain signs,
 * rsa-sha256 first, then ed25519-sha256 (RFC 8463): both signatures when
 * both keys exist. Canonicalisation is relaxed/relaxed; the header fields
 * of [dkim] sign_headers are signed, those of oversign_headers once more
 * than present (RFC 6376 section 8.15). The DKIM-Signature fields are
 * returned CRLF-terminated, to be prepended to the message.
 *
 * Key tools (for mailferryctl): key generation, the TXT record that
 * publishes a key (RFC 6376 section 3.6.1), and the comparison of a
 * published record with a private key.
 */
#ifndef MF_DKIM_H
#define MF_DKIM_H

#include <stddef.h>
#include <uv.h>

#include "lib/buf.h"
#include "lib/config.h"

enum dkim_alg { DKIM_ALG_RSA = 0, DKIM_ALG_ED25519 };

/* One loaded key; the strings live as long as the set. */
struct dkim_key_info {
    const char *domain;           /* lower case, no trailing dot */
    const char *selector;
    enum dkim_alg alg;
    const char *path;             /* the key file */
    int bits;                     /* RSA modulus size; 256 for Ed25519 */
    const char *record;           /* "v=DKIM1; k=rsa; p=..." to publish */
};

struct dkim_keys;

/*
 * Loads the keys named by cfg's [dkim] section. With enabled = no, or
 * neither keys_dir nor key_table set, returns an empty set. Returns NULL
 * with one line in err naming the file (and line) and the reason when a
 * key cannot be used: unreadable, accessible by group or others, not a
 * private key, of the wrong type, too short, or a selector given twice.
 */
struct dkim_keys *dkim_keys_load(const struct mf_config *cfg, char *err, size_t errlen);

struct dkim_keys *dkim_keys_ref(struct dkim_keys *k);
void dkim_keys_unref(struct dkim_keys *k);

size_t dkim_keys_count(const struct dkim_keys *k);
/* The i-th key (ordered by domain, then RSA before Ed25519, then
 * selector), or NULL past the end. */
const struct dkim_key_info *dkim_keys_get(const struct dkim_keys *k, size_t i);

/*
 * The domain that signs for domain: domain itself when it has a key, else
 * its nearest parent with one, else NULL. The pointer lives as long as
 * the set.
 */
const char *dkim_keys_signer(const struct dkim_keys *k, const char *domain);

/*
 * Finds the domain of the first mailbox of the first From: header field
 * of msg (RFC 5322 sections 3.4 and 3.6.2; comments, quoted strings,
 * display names, groups and folding handled) and writes it, lower-cased
 * without a trailing dot, into out. Returns 0, or -1 when there is no
 * From: field, no address, a domain literal, or out is too small.
 */
int dkim_from_domain(const char *msg, size_t len, char *out, size_t n);

/*
 * Picks the signing domain of a message as described above and writes it
 * into d (size n). Returns 1 when a key will sign, 0 when not; the domain
 * looked for (From:, else envelope) is then in d ("" when none).
 */
int dkim_pick(const struct dkim_keys *k, const char *msg, size_t len, const char *env_from,
              char *d, size_t n);

/*
 * Signs msg (the whole message, CRLF line ends) with every key of domain
 * d and appends one "DKIM-Signature: ...\r\n" field per key to out. id is
 * the queue id, for the library's logs. Thread-safe; this is the CPU-heavy
 * part (an RSA-2048 signature takes about a millisecond). Returns 0, or -1
 * with the reason in err (nothing appended).
 */
int dkim_sign_message(const struct dkim_keys *k, const char *d, const char *id,
                      const char *msg, size_t len, struct buf *out, char *err, size_t errlen);

/*
 * status 0: sigs holds the DKIM-Signature fields (valid during the call);
 * else err says why signing failed.
 */
typedef void (*dkim_sign_cb)(int status, const char *sigs, size_t siglen, const char *err,
                             void *arg);

/*
 * The gateway's entry: picks the signing domain of msg (dkim_pick()) and,
 * when a key will sign, signs on the libuv threadpool and calls cb exactly
 * once from the loop, then returns 1. msg must stay unchanged until then;
 * the job holds a reference on k. Returns 0 without calling cb when the
 * message is not to be signed (an empty set, or no key for its domains,
 * which is logged with the queue id).
 */
int dkim_sign_async(uv_loop_t *loop, struct dkim_keys *k, const char *id, const char *env_from,
                    const char *msg, size_t len, dkim_sign_cb cb, void *arg);

/* "rsa" / "ed25519", and back (0, or -1 for another name). */
const char *dkim_alg_name(enum dkim_alg alg);
int dkim_alg_parse(const char *s, enum dkim_alg *out);

/*
 * Generates a private key (RSA of bits bits, 1024..8192, or Ed25519, bits
 * ignored) and writes it as PEM (PKCS#8) to path, which must not exist,
 * with mode 0600. On success returns 0 and the record to publish in
 * *record (freed by the caller). Returns -1 with the reason in err.
 */
int dkim_keygen(enum dkim_alg alg, int bits, const char *path, char **record, char *err,
                size_t errlen);

/* Outcomes of dkim_record_check(). */
enum dkim_record_status {
    DKIM_REC_OK = 0,
    DKIM_REC_TESTING,             /* matches, but t=y: receivers may ignore failures */
    DKIM_REC_MISMATCH,            /* p= holds another key */
    DKIM_REC_REVOKED,             /* p= is empty */
    DKIM_REC_WRONG_TYPE,          /* k= names another algorithm, or h= lacks sha256 */
    DKIM_REC_SYNTAX,              /* not a DKIM key record */
};

/*
 * Compares a published key record (the joined TXT strings, RFC 6376
 * section 3.6.1 tag-list) with key. Returns a DKIM_REC_* value and a
 * one-line explanation in why.
 */
enum dkim_record_status dkim_record_check(const char *txt, size_t len,
                                          const struct dkim_key_info *key, char *why,
                                          size_t n);

#endif
