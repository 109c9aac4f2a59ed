/* router.h: the router actor.
 *
 * Owns routing state: which devices each account has and which device a new
 * message goes to; hands out device ids; creates devices (and their actors).
 * Reads devices' online flags and queue depths from their handles. */
#ifndef TT_ACTORS_ROUTER_H
#define TT_ACTORS_ROUTER_H

#include "runtime/actor.h"

struct tt_server;

/* Loads every device from the store, spawns its actor, and creates the
 * router. NULL on failure (logged). */
rt_actor *router_new(struct tt_server *srv);

#endif
