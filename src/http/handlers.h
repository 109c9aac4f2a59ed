/* handlers.h: the REST routes (API.md) and token authentication. */
#ifndef TT_HTTP_HANDLERS_H
#define TT_HTTP_HANDLERS_H

#include <jansson.h>
#include "http/http.h"
#include "store/store.h"

const http_route *handlers_routes(size_t *n);
int handlers_auth(void *app, const char *token, uint64_t *account_id, uint64_t *token_id);
/* Frees the HTTP workers' reply mailboxes; only after the scheduler stopped. */
void handlers_free_waiters(void);
/* When token id was last used, as seen by this process (0: not since start). */
int64_t tokens_last_used(uint64_t token_id);
/* A token is being revoked: workers forget the token they remember. */
void tokens_revoked(void);
/* Records each response in the metrics. */
void handlers_on_response(void *app, const char *route, const char *method, int status);
/* The API's JSON view of a message. */
json_t *view_message(const msg_rec *m);

#endif
