/*
 * users: the submission users file.
 *
 * One user per line: "user:crypt-hash:domain,domain". The hash is any
 * crypt(3) hash libxcrypt verifies (yescrypt "$y$", SHA-512-crypt "$6$" as
 * "openssl passwd -6" makes). The domains are the sender domains the user
 * may use in MAIL FROM; "*" allows any. Empty lines and lines starting with
 * '#' are ignored. The file is refused when others may read or write it
 * (mode & 006), since the hashes can be attacked offline.
 *
 * A struct users is immutable after load and reference counted, so a
 * reload can replace it while a verification runs on a worker thread.
 */
#ifndef MF_USERS_H
#define MF_USERS_H

#include <stddef.h>

struct users;

/* Loads the file. Returns NULL with a message in err naming the file and
 * line (or the permission problem). */
struct users *users_load(const char *path, char *err, size_t errlen);

struct users *users_ref(struct users *u);
void users_unref(struct users *u);

/*
 * Verifies a password with crypt_r(). Slow by design (the hash's cost):
 * call it off the event loop (uv_queue_work). Thread-safe. An unknown user
 * costs a comparable crypt so timing does not reveal which users exist.
 * Returns 1 when the user exists and the password matches, else 0.
 */
int users_verify(const struct users *u, const char *user, const char *pass);

/* Returns 1 when user may send with this sender domain (case-insensitive;
 * "*" allows every domain, including the null sender), else 0. */
int users_sender_allowed(const struct users *u, const char *user, const char *domain);

size_t users_count(const struct users *u);

#endif
