build-dev/obj/sparkctl/cmd-status.o: sparkctl/cmd-status.c \
 sparkctl/sparkctl.h proto/proto.h common/util.h
sparkctl/sparkctl.h:
proto/proto.h:
common/util.h:
