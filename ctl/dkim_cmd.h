/*
 * dkim_cmd: "mailferryctl dkim", the DKIM key tools (gateway/dkim.h,
 * docs/dkim.md).
 *
 *   dkim keygen DOMAIN SELECTOR [--type rsa|ed25519] [--bits N]
 *                               [--dir DIR | --out FILE]
 *       Generates a private key (RSA 2048 bits by default, or Ed25519),
 *       writes it with mode 0600 (never over an existing file) into
 *       [dkim] keys_dir (or DIR) as <domain>.<selector>.<type>.key, or to
 *       FILE, and prints the TXT record to publish, split into strings of
 *       at most 255 octets (RFC 1035 section 3.3.14).
 *   dkim records [DOMAIN]
 *       Prints the TXT record of every configured key (or those of one
 *       domain), read from the private keys.
 *
 * config_path is the configuration file to read (mailferryctl's --config,
 * $MAILFERRY_CONFIG or the default); keygen with --dir or --out reads none.
 * argv[0] is "dkim". Returns a CTL_EXIT_* code: 0 done, 1 the key could not
 * be written or read, 2 bad usage or configuration.
 */
#ifndef MF_CTL_DKIM_CMD_H
#define MF_CTL_DKIM_CMD_H

int ctl_dkim_main(int argc, char **argv, const char *config_path);

/* The usage lines of the dkim commands, for mailferryctl's help. */
extern const char ctl_dkim_usage[];

#endif
