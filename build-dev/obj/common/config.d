build-dev/obj/common/config.o: common/config.c common/config.h \
 common/url.h common/log.h common/util.h
common/config.h:
common/url.h:
common/log.h:
common/util.h:
