build-dev/obj/sparkctl/client.o: sparkctl/client.c sparkctl/sparkctl.h \
 proto/proto.h common/config.h common/url.h common/util.h
sparkctl/sparkctl.h:
proto/proto.h:
common/config.h:
common/url.h:
common/util.h:
