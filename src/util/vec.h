/* vec.h: growing a heap array by doubling. */
#ifndef TT_UTIL_VEC_H
#define TT_UTIL_VEC_H

#include <stddef.h>

/* Makes *items (with *cap elements of size elem) hold at least need
 * elements, doubling from min_cap. 0, or -ENOMEM with *items unchanged. */
int tt_vec_reserve(void **items, size_t *cap, size_t need, size_t elem, size_t min_cap);

#define TT_VEC_RESERVE(items, cap, need, min_cap) \
    tt_vec_reserve((void **)&(items), &(cap), (need), sizeof(*(items)), (min_cap))

#endif
