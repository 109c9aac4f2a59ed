/* test_phone.c: phone number normalisation and alphanumeric sender names
 * (API.md sections 1 and 8). */
#include <errno.h>

#include "check.h"
#include "util/phone.h"

static void expect_norm(const char *in, const char *want)
{
    char out[TT_PHONE_MAX];
    memset(out, '#', sizeof out);
    int rc = tt_phone_normalize(in, out);
    if (rc != 0)
        fprintf(stderr, "rejected \"%s\"\n", in);
    CHECK_EQ_INT(rc, 0);
    if (rc == 0)
        CHECK_EQ_STR(out, want);
}

static void expect_bad(const char *in)
{
    char out[TT_PHONE_MAX] = "unchanged";
    int rc = tt_phone_normalize(in, out);
    if (rc != -EINVAL)
        fprintf(stderr, "accepted \"%s\"\n", in ? in : "(null)");
    CHECK_EQ_INT(rc, -EINVAL);
    CHECK_EQ_STR(out, "unchanged"); /* untouched on error */
}

static void test_normalize(void)
{
    expect_norm("+63 917-123-4567", "+639171234567");
    expect_norm("+639171234567", "+639171234567");
    expect_norm("(02) 8123.4567", "0281234567");
    expect_norm("09171234567", "09171234567"); /* local: kept as dialled */
    expect_norm("123", "123");                   /* 3 digits: shortest */
    expect_norm("+123", "+123");
    expect_norm("123456789012345", "123456789012345"); /* 15 digits */
    expect_norm("+123456789012345", "+123456789012345");
    expect_norm(" + 1 (555) 010-0000 ", "+15550100000"); /* '+' first kept char */
    expect_norm("1-2-3", "123");
    expect_norm("((1)).2..3--", "123");
}

static void test_reject(void)
{
    expect_bad("");
    expect_bad("   ");
    expect_bad("+");
    expect_bad("12");               /* too short */
    expect_bad("+12");
    expect_bad("- ( ) .");
    expect_bad("1234567890123456"); /* 16 digits */
    expect_bad("+1234567890123456");
    expect_bad("+63 917 123 4567 890 12");
    expect_bad("1234567890123456789012345678901234567890");
    expect_bad("+63917ABC4567");    /* letters */
    expect_bad("abc");
    expect_bad("0917-CALL-NOW");
    expect_bad("++639171234567");   /* two '+' */
    expect_bad("+63+9171234567");
    expect_bad("639171234567+");    /* '+' not first */
    expect_bad("63+9171234567");
    expect_bad("0917\t1234567");    /* tab is not a separator */
    expect_bad("0917/1234567");
    expect_bad("0917_1234567");
    expect_bad("\xEF\xBC\x91\xEF\xBC\x92\xEF\xBC\x93"); /* full-width digits */
    expect_bad(NULL);
}

static void test_sender(void)
{
    CHECK_EQ_INT(tt_sender_is_alnum("GCash"), 1);
    CHECK_EQ_INT(tt_sender_is_alnum("A"), 1);
    CHECK_EQ_INT(tt_sender_is_alnum("My Shop 24"), 1);
    CHECK_EQ_INT(tt_sender_is_alnum("ABCDEFGHIJK"), 1);   /* 11 */
    CHECK_EQ_INT(tt_sender_is_alnum("1 2 3 4 5 x"), 1);
    CHECK_EQ_INT(tt_sender_is_alnum("ABCDEFGHIJKL"), 0);  /* 12 */
    CHECK_EQ_INT(tt_sender_is_alnum(""), 0);
    CHECK_EQ_INT(tt_sender_is_alnum("12345"), 0);         /* digits only */
    CHECK_EQ_INT(tt_sender_is_alnum("+639171234567"), 0);
    CHECK_EQ_INT(tt_sender_is_alnum("   "), 0);
    CHECK_EQ_INT(tt_sender_is_alnum("G-Cash"), 0);
    CHECK_EQ_INT(tt_sender_is_alnum("GCash!"), 0);
    CHECK_EQ_INT(tt_sender_is_alnum("Caf\xC3\xA9"), 0);  /* non-ASCII letter */
    CHECK_EQ_INT(tt_sender_is_alnum("G\tCash"), 0);
    CHECK_EQ_INT(tt_sender_is_alnum(NULL), 0);
}

int main(void)
{
    test_normalize();
    test_reject();
    test_sender();
    return check_finish("test_phone");
}
