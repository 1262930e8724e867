/*
 * A strict JSON scan over jsmn's tokens: what the worker's hot path reads without building a DOM.
 *
 * jsmn is lenient: even with JSMN_STRICT it takes [1 2], [1,], {,}, {"a"}, {}{}, tru, 01, 1.5.5, raw control
 * characters and invalid UTF-8 in strings. jscan_run checks the tokens and the bytes between them against the JSON
 * grammar and jansson's limits (depth, integer range, \u0000, surrogate pairs), so input is refused exactly when
 * jansson would refuse it. Tokens come from a caller's array when they fit, else from one bounded allocation.
 */
#ifndef SPARK_JSCAN_H
#define SPARK_JSCAN_H

#include <stdbool.h>
#include <stddef.h>

/* The one configuration of jsmn in this program (the token layout depends on it). */
#define JSMN_STRICT
/* closing brackets and commas in O(depth) rather than a backward scan over every token: no quadratic input */
#define JSMN_PARENT_LINKS
#ifdef JSCAN_IMPLEMENTATION
#define JSMN_STATIC /* jsmn's functions are jscan.c's own */
#else
#define JSMN_HEADER /* the types only */
#endif
#include <jsmn.h>

#define JSCAN_MAX_TOKENS   (1 << 20)
#define JSCAN_MAX_DEPTH    2048 /* jansson's JSON_PARSER_MAX_DEPTH: what it refused stays refused */
#define JSCAN_STACK_TOKENS 128  /* a typical envelope has ~70 tokens, its body ~10: no allocation for those */

struct jscan {
	const char *js;
	size_t len;
	jsmntok_t *tok; /* ntok tokens in document order; tok[0] is the value */
	int ntok;
	jsmntok_t *heap; /* the tokens when the caller's array was too small */
	size_t pos;      /* while checking: the next byte */
	char err[96];
};

/* Tokenize js[0..len) and check it is exactly one JSON value: 0; -1 with s->err; -2 for more than
 * JSCAN_MAX_TOKENS tokens. A primitive only ends at a delimiter: a bare number needs a byte of whitespace after
 * it inside len. Call jscan_free afterwards whatever it returned. */
int jscan_run(struct jscan *s, const char *js, size_t len, jsmntok_t *stack, unsigned nstack);
void jscan_free(struct jscan *s);

/* The index after the value at token i and everything inside it (its next sibling). */
int jscan_after(const struct jscan *s, int i);
#define JSCAN_MAX_NAMES 32
/* For each of names[0..n) (n <= JSCAN_MAX_NAMES): the token of that member's value in the object at token obj (the last
 * one when a key repeats, as jansson keeps), or -1; all -1 when obj is not an object (or is -1). */
void jscan_pick(const struct jscan *s, int obj, const char *const *names, int *val, int n);

/* Token i (-1 = absent: false) is of that type / true / null / a number / an integer as jansson reads them. */
bool jscan_is(const struct jscan *s, int i, jsmntype_t type);
bool jscan_true(const struct jscan *s, int i);
bool jscan_null(const struct jscan *s, int i);
bool jscan_number(const struct jscan *s, int i);
bool jscan_integer(const struct jscan *s, int i, long long *v);
double jscan_double(const struct jscan *s, int i); /* of a number token */
/* The raw JSON text of the value at token i (with the quotes of a string). */
const char *jscan_span(const struct jscan *s, int i, size_t *len);

/* The bytes of a checked string token's content, unescaped (\uXXXX and surrogate pairs to UTF-8) into out, which
 * needs n bytes at most; the length written. */
size_t jscan_unescape(const char *p, size_t n, char *out);
/* The length of the valid UTF-8 sequence at p (RFC 3629: no overlong forms, surrogates or values past U+10FFFF),
 * or 0. */
size_t jscan_utf8_seq(const unsigned char *p, size_t n);

#endif
