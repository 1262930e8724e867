build-dev/obj/worker/broker.o: worker/broker.c common/log.h \
 common/report.h common/util.h worker/worker.h \
 /usr/include/hiredis/hiredis.h /usr/include/hiredis/read.h \
 /usr/include/hiredis/sds.h /usr/include/hiredis/alloc.h common/config.h \
 common/url.h worker/task.h
common/log.h:
common/report.h:
common/util.h:
worker/worker.h:
/usr/include/hiredis/hiredis.h:
/usr/include/hiredis/read.h:
/usr/include/hiredis/sds.h:
/usr/include/hiredis/alloc.h:
common/config.h:
common/url.h:
worker/task.h:
