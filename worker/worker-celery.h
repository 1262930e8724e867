/*
 * The worker's Celery side, as sparkd's commands (common/command.h) and Celery's tools see it: revoked ids, task
 * events, the fd-3 command reader and the answers to queries. Included by worker.h after the types it uses.
 */
#ifndef SPARK_WORKER_CELERY_H
#define SPARK_WORKER_CELERY_H

/* revoke.c */
void revoke_init(struct revoke_set *s);
void revoke_free(struct revoke_set *s);
void revoke_add(struct revoke_set *s, const char *id, double expires);
bool revoke_has_slow(struct revoke_set *s, const char *id);
/* The hot path's check: one branch while nothing is revoked. */
static inline bool
revoke_has(struct revoke_set *s, const char *id)
{
	return s->count > 0 && id != NULL && revoke_has_slow(s, id);
}
/* The reconcile chain's step after every connect: the ids of SPARK_REVOKED_KEY not yet expired. */
void revoke_load(struct chain *c);

/* events.c */
void events_init(struct worker *w);
void events_free(struct worker *w);
void events_flush(struct worker *w); /* end of tick: the tick's events as one PUBLISH */
void events_received(struct worker *w, const struct job *j);
void events_started(struct worker *w, const struct job *j);
void events_succeeded(struct worker *w, const struct job *j, double runtime, const char *result, size_t len);
void events_failed(struct worker *w, const struct job *j, const char *type, const char *msg, bool retried);
void events_revoked(struct worker *w, const struct job *j, bool terminated, const char *signal, bool expired);
void events_rejected(struct worker *w, const struct job *j);

/* commands.c */
void commands_start(struct worker *w); /* watch fd 3 when it is sparkd's socketpair */
void commands_stop(struct worker *w);

/* query.c */
struct command;
void query_answer(struct worker *w, const struct command *c);
void query_count_task(struct worker *w, const char *name); /* a task started: stats' total */
void query_free(struct worker *w);

#endif
