/*
 * Output for sparkctl: colour (only on a TTY, never with NO_COLOR), one-line errors, the formatting of values
 * taken from the daemon's replies (tolerant: a missing field prints "-"), and msgpack -> JSON through jansson.
 */
#include "sparkctl.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

#define C_RED     "\033[31m"
#define C_GREEN   "\033[32m"
#define C_YELLOW  "\033[33m"
#define C_BOLDRED "\033[1;31m"
#define C_DIM     "\033[2m"
#define C_RESET   "\033[0m"

/* Deeper nesting than any status result: a hostile reply must not recurse us off the stack. */
#define OUT_JSON_MAX_DEPTH 64

void
out_init(struct ctl *ctl)
{
	const char *term = getenv("TERM");
	ctl->tty = isatty(STDOUT_FILENO) == 1;
	/* https://no-color.org: its presence turns colour off; a dumb terminal cannot show it */
	ctl->color = ctl->tty && getenv("NO_COLOR") == NULL && !(term != NULL && strcmp(term, "dumb") == 0);
}

const char *
out_color(const struct ctl *ctl, const char *code)
{
	return ctl->color && code != NULL && *code ? code : "";
}

const char *
out_reset(const struct ctl *ctl)
{
	return ctl->color ? C_RESET : "";
}

void
out_err(const struct ctl *ctl, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	/* one line, whatever the daemon or the system put in the message */
	for (char *p = buf; *p; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	fprintf(stderr, "%s: %s\n", ctl->prog, buf);
}

void
out_fmt_rss(char *buf, size_t len, int64_t kib)
{
	if (kib < 0)
		snprintf(buf, len, "-");
	else if (kib < 1024)
		snprintf(buf, len, "%lld KiB", (long long)kib);
	else if (kib < 1024LL * 1024)
		snprintf(buf, len, "%.1f MiB", kib / 1024.0);
	else
		snprintf(buf, len, "%.1f GiB", kib / (1024.0 * 1024.0));
}

/* Local time with milliseconds, one token ("2026-11-26T19:14:27.123") so that log lines split cleanly. */
void
out_fmt_ts(char *buf, size_t len, double ts)
{
	if (!isfinite(ts) || ts < 0 || ts > 253402300799.0) {
		snprintf(buf, len, "-");
		return;
	}
	time_t sec = (time_t)ts;
	/* rounded by hand: sparkctl does not link libm */
	long ms = (long)((ts - (double)sec) * 1000.0 + 0.5);
	if (ms >= 1000) {
		sec++;
		ms -= 1000;
	}
	struct tm tm;
	if (localtime_r(&sec, &tm) == NULL) {
		snprintf(buf, len, "-");
		return;
	}
	char day[32];
	strftime(day, sizeof day, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(buf, len, "%s.%03ld", day, ms);
}

void
out_capitalise(char *buf, size_t len, const char *state)
{
	if (state == NULL || *state == '\0' || strcmp(state, "-") == 0) {
		snprintf(buf, len, "-");
		return;
	}
	snprintf(buf, len, "%s", state);
	if (len > 0)
		buf[0] = (char)toupper((unsigned char)buf[0]);
}

const char *
out_state_color(const char *state)
{
	if (state == NULL)
		return "";
	if (strcasecmp(state, "active") == 0)
		return C_GREEN;
	if (strcasecmp(state, "starting") == 0 || strcasecmp(state, "draining") == 0 ||
	    strcasecmp(state, "stopping") == 0)
		return C_YELLOW;
	if (strcasecmp(state, "backoff") == 0 || strcasecmp(state, "stopped") == 0)
		return C_RED;
	return "";
}

const char *
out_level_color(const char *level)
{
	if (level == NULL)
		return "";
	if (strcasecmp(level, "debug") == 0)
		return C_DIM;
	if (strcasecmp(level, "warning") == 0)
		return C_YELLOW;
	if (strcasecmp(level, "error") == 0)
		return C_RED;
	if (strcasecmp(level, "critical") == 0)
		return C_BOLDRED;
	return "";
}

/* Control characters from a worker's output must not drive the operator's terminal. */
void
out_sanitize(char *s)
{
	for (unsigned char *p = (unsigned char *)s; *p; p++)
		if ((*p < 0x20 && *p != '\t') || *p == 0x7f)
			*p = '?';
}

/* A scalar as text ("-" for nil or a container). Returns 0 when there was a value, -1 otherwise. */
int
out_obj_str(const msgpack_object *o, char *buf, size_t len)
{
	if (len == 0)
		return -1;
	if (o == NULL) {
		snprintf(buf, len, "-");
		return -1;
	}
	switch (o->type) {
	case MSGPACK_OBJECT_STR:
	case MSGPACK_OBJECT_BIN: {
		const char *p = o->type == MSGPACK_OBJECT_STR ? o->via.str.ptr : o->via.bin.ptr;
		size_t n = o->type == MSGPACK_OBJECT_STR ? o->via.str.size : o->via.bin.size;
		if (n >= len)
			n = len - 1;
		memcpy(buf, p, n);
		buf[n] = '\0';
		/* an embedded NUL would cut the text short silently; show it */
		for (size_t i = 0; i < n; i++)
			if (buf[i] == '\0')
				buf[i] = '?';
		out_sanitize(buf);
		return 0;
	}
	case MSGPACK_OBJECT_POSITIVE_INTEGER:
		snprintf(buf, len, "%llu", (unsigned long long)o->via.u64);
		return 0;
	case MSGPACK_OBJECT_NEGATIVE_INTEGER:
		snprintf(buf, len, "%lld", (long long)o->via.i64);
		return 0;
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64:
		snprintf(buf, len, "%g", o->via.f64);
		return 0;
	case MSGPACK_OBJECT_BOOLEAN:
		snprintf(buf, len, "%s", o->via.boolean ? "true" : "false");
		return 0;
	default:
		snprintf(buf, len, "-");
		return -1;
	}
}

void
out_field_str(const msgpack_object *map, const char *key, char *buf, size_t len)
{
	out_obj_str(proto_map_get(map, key), buf, len);
}

void
out_field_int(const msgpack_object *map, const char *key, char *buf, size_t len)
{
	double d;
	if (proto_get_double(map, key, &d) == 1 && isfinite(d))
		snprintf(buf, len, "%.0f", d);
	else
		snprintf(buf, len, "-");
}

void
out_field_duration(const msgpack_object *map, const char *key, char *buf, size_t len)
{
	double d;
	if (proto_get_double(map, key, &d) == 1 && isfinite(d))
		fmt_duration(buf, len, d);
	else
		snprintf(buf, len, "-");
}

/* The last exit as status gives it: its reason says it all ("max-tasks", "crashed (signal 9)", "exited (status 3)"). */
void
out_fmt_exit(char *buf, size_t len, const msgpack_object *last_exit)
{
	char reason[96];
	if (proto_get_str(last_exit, PROTO_F_REASON, reason, sizeof reason) != 1 || reason[0] == '\0') {
		snprintf(buf, len, "-");
		return;
	}
	out_sanitize(reason);
	snprintf(buf, len, "%s", reason);
}

/* A copy of bytes that is valid UTF-8 without NULs: every byte that does not start a well-formed sequence
 * becomes '?'. Same length as the input, so a key or text keeps its shape. */
static char *
utf8_repair(const char *p, size_t n)
{
	char *out = xmalloc(n + 1);
	size_t i = 0;
	while (i < n) {
		unsigned char c = (unsigned char)p[i];
		size_t need;
		if (c >= 0x01 && c < 0x80)
			need = 0;
		else if (c >= 0xc2 && c <= 0xdf)
			need = 1;
		else if (c >= 0xe0 && c <= 0xef)
			need = 2;
		else if (c >= 0xf0 && c <= 0xf4)
			need = 3;
		else {
			out[i++] = '?';
			continue;
		}
		bool ok = i + need < n;
		for (size_t k = 1; ok && k <= need; k++)
			if (((unsigned char)p[i + k] & 0xc0) != 0x80)
				ok = false;
		if (ok && need >= 2) {
			/* overlong forms, UTF-16 surrogates and code points above U+10FFFF */
			unsigned char c1 = (unsigned char)p[i + 1];
			if ((c == 0xe0 && c1 < 0xa0) || (c == 0xed && c1 >= 0xa0) || (c == 0xf0 && c1 < 0x90) ||
			    (c == 0xf4 && c1 >= 0x90))
				ok = false;
		}
		if (!ok) {
			out[i++] = '?';
			continue;
		}
		memcpy(out + i, p + i, need + 1);
		i += need + 1;
	}
	out[n] = '\0';
	return out;
}

static json_t *
json_text(const char *p, size_t n)
{
	json_t *j = json_stringn(p, n);
	if (j != NULL)
		return j;
	/* not UTF-8 (or holds NUL): show what can be shown rather than fail the whole document */
	char *fixed = utf8_repair(p, n);
	j = json_stringn(fixed, n);
	free(fixed);
	return j;
}

static json_t *
to_json(const msgpack_object *o, int depth)
{
	if (depth > OUT_JSON_MAX_DEPTH)
		return NULL;
	switch (o->type) {
	case MSGPACK_OBJECT_NIL:
		return json_null();
	case MSGPACK_OBJECT_BOOLEAN:
		return json_boolean(o->via.boolean);
	case MSGPACK_OBJECT_POSITIVE_INTEGER:
		if (o->via.u64 > (uint64_t)INT64_MAX)
			return json_real((double)o->via.u64);
		return json_integer((json_int_t)o->via.u64);
	case MSGPACK_OBJECT_NEGATIVE_INTEGER:
		return json_integer((json_int_t)o->via.i64);
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64:
		/* JSON has no NaN or infinity */
		return isfinite(o->via.f64) ? json_real(o->via.f64) : json_null();
	case MSGPACK_OBJECT_STR:
		return json_text(o->via.str.ptr, o->via.str.size);
	case MSGPACK_OBJECT_BIN:
		return json_text(o->via.bin.ptr, o->via.bin.size);
	case MSGPACK_OBJECT_ARRAY: {
		json_t *a = json_array();
		if (a == NULL)
			return NULL;
		for (uint32_t i = 0; i < o->via.array.size; i++) {
			json_t *v = to_json(&o->via.array.ptr[i], depth + 1);
			if (v == NULL || json_array_append_new(a, v) < 0) {
				json_decref(a);
				return NULL;
			}
		}
		return a;
	}
	case MSGPACK_OBJECT_MAP: {
		json_t *m = json_object();
		if (m == NULL)
			return NULL;
		for (uint32_t i = 0; i < o->via.map.size; i++) {
			const msgpack_object_kv *kv = &o->via.map.ptr[i];
			char key[256];
			/* JSON keys are strings: other msgpack keys are shown as their text */
			out_obj_str(&kv->key, key, sizeof key);
			if (kv->key.type == MSGPACK_OBJECT_STR) {
				char *fixed = utf8_repair(kv->key.via.str.ptr, kv->key.via.str.size);
				spark_strlcpy(key, fixed, sizeof key);
				free(fixed);
			}
			json_t *v = to_json(&kv->val, depth + 1);
			if (v == NULL || json_object_set_new(m, key, v) < 0) {
				json_decref(m);
				return NULL;
			}
		}
		return m;
	}
	default:
		return json_null();
	}
}

json_t *
out_msgpack_to_json(const msgpack_object *o)
{
	return to_json(o, 0);
}

int
out_print_json(const msgpack_object *o, bool pretty)
{
	json_t *j = out_msgpack_to_json(o);
	if (j == NULL)
		return -1;
	size_t flags = JSON_ENCODE_ANY | (pretty ? JSON_INDENT(2) : JSON_COMPACT);
	int rc = json_dumpf(j, stdout, flags);
	json_decref(j);
	if (rc < 0)
		return -1;
	fputc('\n', stdout);
	return 0;
}

/* TIMESTAMP LEVEL WORKER[PID] MESSAGE */
void
out_log_line(const struct ctl *ctl, const msgpack_object *line)
{
	char ts[48], level[16], worker[256], pid[32];
	char msg[8192];
	double t;
	if (proto_get_double(line, PROTO_F_TS, &t) == 1)
		out_fmt_ts(ts, sizeof ts, t);
	else
		snprintf(ts, sizeof ts, "-");
	out_field_str(line, PROTO_F_LEVEL, level, sizeof level);
	for (char *p = level; *p; p++)
		*p = (char)toupper((unsigned char)*p);
	out_field_str(line, PROTO_F_WORKER, worker, sizeof worker);
	out_field_int(line, PROTO_F_PID, pid, sizeof pid);
	const msgpack_object *mo = proto_map_get(line, PROTO_F_MSG);
	if (mo != NULL && mo->type == MSGPACK_OBJECT_STR) {
		/* a captured line may still carry its newline; any other control byte is shown as '?' */
		size_t n = mo->via.str.size;
		while (n > 0 && (mo->via.str.ptr[n - 1] == '\n' || mo->via.str.ptr[n - 1] == '\r'))
			n--;
		msgpack_object trimmed = *mo;
		trimmed.via.str.size = (uint32_t)n;
		out_obj_str(&trimmed, msg, sizeof msg);
	} else {
		out_obj_str(mo, msg, sizeof msg);
	}
	if (strcmp(pid, "-") == 0)
		printf("%s %s%s%s %s %s\n", ts, out_color(ctl, out_level_color(level)), level, out_reset(ctl), worker,
		       msg);
	else
		printf("%s %s%s%s %s[%s] %s\n", ts, out_color(ctl, out_level_color(level)), level, out_reset(ctl),
		       worker, pid, msg);
}

void
out_dropped_line(const struct ctl *ctl, const msgpack_object *payload)
{
	char n[32];
	out_field_int(payload, PROTO_N_DROPPED, n, sizeof n);
	printf("%s-- %s lines dropped (reader too slow) --%s\n", out_color(ctl, C_YELLOW), n, out_reset(ctl));
}

/* ---- the Celery side of status (sparkd/celery.c) ---- */

/* "Down (Connection refused)": sparkd's broker connection as a worker's Celery side depends on it. Returns false
 * when it is up (nothing to say) or not reported (an older sparkd). */
static bool
out_broker_text(const msgpack_object *broker, char *buf, size_t len)
{
	char state[32], capital[32], error[300];
	if (broker == NULL || broker->type != MSGPACK_OBJECT_MAP)
		return false;
	out_field_str(broker, PROTO_F_BROKER_STATE, state, sizeof state);
	if (strcmp(state, "up") == 0)
		return false;
	out_capitalise(capital, sizeof capital, state);
	if (out_obj_str(proto_map_get(broker, PROTO_F_BROKER_ERROR), error, sizeof error) == 0)
		snprintf(buf, len, "%s (%s)", capital, error);
	else
		snprintf(buf, len, "%s", capital);
	return true;
}

/* A worker's lines beyond the guide's six: the broker when it is not up (always), task events and queues. */
void
out_celery_worker(const struct ctl *ctl, const msgpack_object *cel, bool verbose)
{
	char text[400];
	if (out_broker_text(proto_map_get(cel, PROTO_F_BROKER), text, sizeof text))
		printf("Broker: %s%s%s\n", out_color(ctl, C_RED), text, out_reset(ctl));
	if (!verbose || cel == NULL)
		return;
	bool on = false;
	if (proto_get_bool(cel, PROTO_F_TASK_EVENTS, &on) == 1)
		printf("Task Events: %s\n", on ? "on" : "off");
	const msgpack_object *q = proto_map_get(cel, PROTO_F_QUEUES);
	if (q == NULL || q->type != MSGPACK_OBJECT_ARRAY)
		return;
	printf("Queues:");
	for (uint32_t i = 0; i < q->via.array.size; i++) {
		char name[256];
		out_obj_str(&q->via.array.ptr[i], name, sizeof name);
		printf("%s %s", i ? "," : "", name);
	}
	printf("\n");
}

/* The supervisor's Celery lines (status --verbose): broker, worker events, revoked ids. */
void
out_celery_supervisor(const struct ctl *ctl, const msgpack_object *cel)
{
	if (cel == NULL || cel->type != MSGPACK_OBJECT_MAP)
		return;
	const msgpack_object *broker = proto_map_get(cel, PROTO_F_BROKER);
	char text[400], url[512];
	out_field_str(broker, PROTO_F_BROKER_URL, url, sizeof url);
	if (out_broker_text(broker, text, sizeof text))
		printf("  Broker: %s%s%s, %s\n", out_color(ctl, C_RED), text, out_reset(ctl), url);
	else
		printf("  Broker: Up, %s\n", url);
	const msgpack_object *ev = proto_map_get(cel, PROTO_F_EVENTS);
	bool beats = false;
	double freq = 0;
	if (proto_get_bool(ev, PROTO_F_HEARTBEATS, &beats) == 1)
		printf("  Worker Events: %s\n", beats && proto_get_double(ev, PROTO_F_FREQ, &freq) == 1 && freq > 0
		                                    ? "online, heartbeat, offline"
		                                    : "off");
	const msgpack_object *rv = proto_map_get(cel, PROTO_F_REVOKED);
	char count[32];
	out_field_int(rv, PROTO_F_COUNT, count, sizeof count);
	printf("  Revoked: %s\n", count);
	const msgpack_object *ids = proto_map_get(rv, PROTO_F_IDS);
	for (uint32_t i = 0; ids != NULL && ids->type == MSGPACK_OBJECT_ARRAY && i < ids->via.array.size; i++) {
		char id[16385];
		out_obj_str(&ids->via.array.ptr[i], id, sizeof id);
		printf("    %s\n", id);
	}
}
