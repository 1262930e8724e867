build-dev/pic/common/url.o: common/url.c common/url.h common/util.h
common/url.h:
common/util.h:
