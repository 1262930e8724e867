build-dev/pic/worker/workflow-plugin.o: worker/workflow-plugin.c \
 common/log.h worker/task.h common/config.h common/url.h
common/log.h:
worker/task.h:
common/config.h:
common/url.h:
