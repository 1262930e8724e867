build-dev/obj/sparkctl/parse.o: sparkctl/parse.c sparkctl/sparkctl.h \
 proto/proto.h common/log.h common/util.h
sparkctl/sparkctl.h:
proto/proto.h:
common/log.h:
common/util.h:
