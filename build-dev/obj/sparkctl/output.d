build-dev/obj/sparkctl/output.o: sparkctl/output.c sparkctl/sparkctl.h \
 proto/proto.h common/util.h
sparkctl/sparkctl.h:
proto/proto.h:
common/util.h:
