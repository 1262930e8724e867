build-dev/pic/common/report.o: common/report.c common/report.h \
 common/util.h
common/report.h:
common/util.h:
