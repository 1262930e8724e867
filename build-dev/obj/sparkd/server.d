build-dev/obj/sparkd/server.o: sparkd/server.c sparkd/sparkd.h \
 common/config.h common/url.h common/log.h proto/proto.h common/report.h \
 common/util.h
sparkd/sparkd.h:
common/config.h:
common/url.h:
common/log.h:
proto/proto.h:
common/report.h:
common/util.h:
