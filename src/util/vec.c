/* vec.c: see vec.h. */
#include "util/vec.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

int tt_vec_reserve(void **items, size_t *cap, size_t need, size_t elem, size_t min_cap)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : (min_cap ? min_cap : 1);
    while (n < need) {
        if (n > SIZE_MAX / 2 / elem)
            return -ENOMEM;
        n *= 2;
    }
    void *v = realloc(*items, n * elem);
    if (!v)
        return -ENOMEM;
    *items = v;
    *cap = n;
    return 0;
}
