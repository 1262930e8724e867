build-dev/obj/sparkd/spawn.o: sparkd/spawn.c sparkd/sparkd.h \
 common/config.h common/url.h common/log.h proto/proto.h common/report.h \
 common/util.h
sparkd/sparkd.h:
common/config.h:
common/url.h:
common/log.h:
proto/proto.h:
common/report.h:
common/util.h:
