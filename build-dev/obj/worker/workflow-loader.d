build-dev/obj/worker/workflow-loader.o: worker/workflow-loader.c \
 common/log.h worker/task.h common/config.h common/url.h common/util.h
common/log.h:
worker/task.h:
common/config.h:
common/url.h:
common/util.h:
