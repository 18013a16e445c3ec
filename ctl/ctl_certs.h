/*
 * ctl_certs: "mailferryctl tunnel-certs", the private PKI of the tunnel
 * between routers and the relay (docs/relay.md, README "Running the relay
 * on a physical host").
 *
 *   tunnel-certs DIR [--relay-name NAME ...] [--routers N] [--days D]
 *                    [--ca-days D] [--key-type ec|rsa] [--force]
 *       Makes, with the OpenSSL library, in DIR (created with mode 0700
 *       when missing):
 *         tunnel-ca.key, tunnel-ca.crt   the CA (CA:TRUE, pathlen 0,
 *                                        keyCertSign and cRLSign)
 *         relay.key, relay.crt           the relay's server certificate:
 *                                        CN and subjectAltName of every
 *                                        NAME (a DNS name, or an IP address
 *                                        as an iPAddress entry), serverAuth
 *         router-1.key ... router-N.key, router-1.crt ... router-N.crt
 *                                        one client certificate per router
 *                                        (CN router-<i>), clientAuth
 *       Keys are EC P-256 (or RSA 2048 bits with --key-type rsa), written
 *       unencrypted in PKCS#8 PEM with mode 0600; certificates are signed
 *       with SHA-256, valid D days (default 825; the CA 3650). Existing
 *       files are never overwritten without --force. Prints the [relay]
 *       section and the [route relay] section to paste, with the SHA-256
 *       fingerprints for pinned_clients.
 *
 *   tunnel-certs DIR --add-router NAME [--add-router NAME ...] [--days D]
 *                    [--key-type ec|rsa] [--force]
 *       Issues more client certificates (NAME.key, NAME.crt, CN NAME) with
 *       the CA already in DIR.
 *
 * argv[0] is "tunnel-certs". No configuration file is read. Returns a
 * CTL_EXIT_* code: 0 done, 1 a file could not be read or written (or
 * exists), 2 bad usage.
 */
#ifndef MF_CTL_CERTS_H
#define MF_CTL_CERTS_H

int ctl_certs_main(int argc, char **argv);

/* The usage lines of tunnel-certs, for mailferryctl's help. */
extern const char ctl_certs_usage[];

#endif
