build-dev/obj/sparkctl/cmd-stop.o: sparkctl/cmd-stop.c \
 sparkctl/sparkctl.h proto/proto.h common/util.h
sparkctl/sparkctl.h:
proto/proto.h:
common/util.h:
