/*
 * The control socket's insides (DESIGN §4), shared by its files: client lifecycle (ctl-client.c), peer checks
 * (ctl-peer.c), log followers (ctl-follow.c), methods (ctl-methods.c), status packing (ctl-status.c), binding
 * and accepting (server.c). The rest of sparkd sees only what sparkd.h declares.
 */
#ifndef SPARKD_CTL_H
#define SPARKD_CTL_H

#include <sys/socket.h>

#include "sparkd.h"

/* ctl-client.c */
struct ctl_client *ctl_client_new(struct sparkd *sd, int fd, const struct ucred *cr);
void ctl_client_send(struct ctl_client *c, const msgpack_sbuffer *sb);
void ctl_reply_error(struct ctl_client *c, uint32_t msgid, const char *code, const char *message);
void ctl_client_close(struct ctl_client *c);
void ctl_client_fail(struct ctl_client *c, uint32_t msgid, const char *code, const char *message);

/* ctl-peer.c */
int ctl_clients_of(struct sparkd *sd, uid_t uid);

/* ctl-follow.c */
void ctl_pack_log_line(msgpack_packer *pk, const struct lc_line *l);
void ctl_follow_send_dropped(struct ctl_client *c);

/* ctl-methods.c */
void ctl_dispatch(struct ctl_client *c, const msgpack_object *o);

#endif
