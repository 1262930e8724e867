build-dev/obj/worker/tasks.o: worker/tasks.c worker/task.h \
 common/config.h common/url.h common/util.h
worker/task.h:
common/config.h:
common/url.h:
common/util.h:
