build-dev/obj/worker/result.o: worker/result.c common/util.h \
 worker/worker.h /usr/include/hiredis/hiredis.h \
 /usr/include/hiredis/read.h /usr/include/hiredis/sds.h \
 /usr/include/hiredis/alloc.h common/config.h common/url.h worker/task.h
common/util.h:
worker/worker.h:
/usr/include/hiredis/hiredis.h:
/usr/include/hiredis/read.h:
/usr/include/hiredis/sds.h:
/usr/include/hiredis/alloc.h:
common/config.h:
common/url.h:
worker/task.h:
