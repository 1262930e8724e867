build-dev/obj/sparkd/lifecycle.o: sparkd/lifecycle.c sparkd/sparkd.h \
 common/config.h common/url.h common/log.h proto/proto.h common/report.h \
 common/util.h
sparkd/sparkd.h:
common/config.h:
common/url.h:
common/log.h:
proto/proto.h:
common/report.h:
common/util.h:
