build-dev/obj/sparkctl/cmd-db.o: sparkctl/cmd-db.c sparkctl/sparkctl.h \
 proto/proto.h
sparkctl/sparkctl.h:
proto/proto.h:
