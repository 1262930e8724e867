build-dev/obj/sparkctl/cmd-start.o: sparkctl/cmd-start.c \
 sparkctl/sparkctl.h proto/proto.h common/config.h common/url.h \
 common/util.h
sparkctl/sparkctl.h:
proto/proto.h:
common/config.h:
common/url.h:
common/util.h:
