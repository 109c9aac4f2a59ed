/* otp.h: the OTP actor (API.md section 6).
 *
 * Owns one-time codes: their keyed hashes (never the codes), expiry, wrong
 * attempts, and the per-number send limits (30 s between sends, 5 in any
 * sliding hour). A send generates a code from the CSPRNG, has the router send
 * it as a high-priority message (normal routing and pinning apply; the text
 * is stored sealed and shown masked), and only when the router has stored
 * that message does it store the new code and answer. State lives in RocksDB
 * (key O account number) and survives a crash; this actor, its only writer,
 * keeps the entries it touched in memory, so two verifies of one code are
 * decided one after the other: exactly one succeeds. */
#ifndef TT_ACTORS_OTP_H
#define TT_ACTORS_OTP_H

#include "runtime/actor.h"

struct tt_server;

rt_actor *otp_new(struct tt_server *srv);

#endif
