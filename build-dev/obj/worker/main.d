build-dev/obj/worker/main.o: worker/main.c common/config.h common/url.h \
 common/log.h common/url.h common/util.h worker/worker.h \
 /usr/include/hiredis/hiredis.h /usr/include/hiredis/read.h \
 /usr/include/hiredis/sds.h /usr/include/hiredis/alloc.h worker/task.h
common/config.h:
common/url.h:
common/log.h:
common/url.h:
common/util.h:
worker/worker.h:
/usr/include/hiredis/hiredis.h:
/usr/include/hiredis/read.h:
/usr/include/hiredis/sds.h:
/usr/include/hiredis/alloc.h:
worker/task.h:
