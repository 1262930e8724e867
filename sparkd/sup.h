/*
 * Supervision's insides, shared by its files: process lifecycle (supervise.c), reports on fd 3 (sup-report.c),
 * states and counts (sup-state.c), the memory and time-limit backstops (sup-limits.c), stopping (sup-stop.c).
 */
#ifndef SPARKD_SUP_H
#define SPARKD_SUP_H

#include "sparkd.h"

/* supervise.c */
void sup_task_clear(struct sd_task *t);

/* sup-report.c */
void sup_read_reports(struct sd_proc *p);
void sup_report_cb(evutil_socket_t fd, short what, void *arg);

/* sup-stop.c */
void sup_stop_init(struct sparkd *sd);

#endif
