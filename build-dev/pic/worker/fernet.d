build-dev/pic/worker/fernet.o: worker/fernet.c worker/fernet.h \
 common/util.h
worker/fernet.h:
common/util.h:
