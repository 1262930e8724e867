build-dev/obj/sparkd/systemd.o: sparkd/systemd.c sparkd/sparkd.h \
 common/config.h common/url.h common/log.h proto/proto.h common/report.h \
 common/util.h
sparkd/sparkd.h:
common/config.h:
common/url.h:
common/log.h:
proto/proto.h:
common/report.h:
common/util.h:
