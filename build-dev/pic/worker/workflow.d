build-dev/pic/worker/workflow.o: worker/workflow.c worker/fernet.h \
 common/log.h worker/source.h worker/store.h \
 /usr/include/postgresql/libpq-fe.h \
 /usr/include/postgresql/postgres_ext.h \
 /usr/include/postgresql/pg_config_ext.h worker/task.h common/config.h \
 common/url.h common/util.h
worker/fernet.h:
common/log.h:
worker/source.h:
worker/store.h:
/usr/include/postgresql/libpq-fe.h:
/usr/include/postgresql/postgres_ext.h:
/usr/include/postgresql/pg_config_ext.h:
worker/task.h:
common/config.h:
common/url.h:
common/util.h:
