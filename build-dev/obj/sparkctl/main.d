build-dev/obj/sparkctl/main.o: sparkctl/main.c sparkctl/sparkctl.h \
 proto/proto.h common/util.h
sparkctl/sparkctl.h:
proto/proto.h:
common/util.h:
