build-dev/obj/sparkd/main.o: sparkd/main.c sparkd/sparkd.h \
 common/config.h common/url.h common/log.h proto/proto.h common/report.h \
 common/util.h common/url.h
sparkd/sparkd.h:
common/config.h:
common/url.h:
common/log.h:
proto/proto.h:
common/report.h:
common/util.h:
common/url.h:
