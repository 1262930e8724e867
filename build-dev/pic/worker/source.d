build-dev/pic/worker/source.o: worker/source.c common/log.h \
 worker/source.h common/url.h common/util.h
common/log.h:
worker/source.h:
common/url.h:
common/util.h:
