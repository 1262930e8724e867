build-dev/obj/sparkctl/cmd-logs.o: sparkctl/cmd-logs.c \
 sparkctl/sparkctl.h proto/proto.h common/log.h common/util.h
sparkctl/sparkctl.h:
proto/proto.h:
common/log.h:
common/util.h:
