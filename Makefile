# Spark workers in C: sparkd (supervisor), spark-worker, sparkctl (CLI; also installed as automagik-spark).
#   make            build (warnings are errors)
#   make test       install missing Debian packages, build, run unit + integration tests
#   make test SAN=1 the same under AddressSanitizer + UndefinedBehaviorSanitizer
#   make run        start a private Redis (and PostgreSQL) when none is configured, run sparkd in the foreground
#   make install    PREFIX=/usr/local DESTDIR=

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SBINDIR ?= $(PREFIX)/sbin
MANDIR ?= $(PREFIX)/share/man
DOCDIR ?= $(PREFIX)/share/doc/spark-workers
DESTDIR ?=

CC ?= cc
PKG_CONFIG ?= pkg-config
PYTHON ?= /usr/bin/python3

ifeq ($(SAN),1)
BUILD ?= build-san
SANFLAGS = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
OPT ?= -O1 -g
else
BUILD ?= build
SANFLAGS =
OPT ?= -O2 -g
endif

WARN = -Wall -Wextra -Werror -Wno-unused-parameter
CPPFLAGS_ALL = -D_GNU_SOURCE -Icommon -Iproto
CFLAGS_ALL = -std=c11 $(OPT) $(WARN) $(SANFLAGS) -pthread $(CFLAGS)

PC = $(shell $(PKG_CONFIG) --cflags $(1) 2>/dev/null)
PL = $(shell $(PKG_CONFIG) --libs $(1) 2>/dev/null)

# Only what each program needs at run time: every library a worker links costs resident memory in each of its
# processes (libpq + libcurl + libcrypto: ~7 MiB), hence the workflow plugin below.
PKGS_COMMON =
PKGS_SPARKD = $(PKGS_COMMON) libevent msgpack hiredis jansson
PKGS_WORKER = $(PKGS_COMMON) hiredis jansson libevent
PKGS_WORKFLOW = libpq libcurl libcrypto jansson libevent
PKGS_CTL = $(PKGS_COMMON) msgpack jansson

COMMON_SRC = $(wildcard common/*.c)
PROTO_SRC = $(wildcard proto/*.c)
SPARKD_SRC = $(wildcard sparkd/*.c)
WORKER_SRC = $(wildcard worker/*.c)
# The workflow stack (PostgreSQL, HTTP sources, Fernet): built into spark-workflow.so, never into spark-worker,
# which loads it with dlopen (worker/workflow-loader.c) only when DATABASE_URL is set.
WORKFLOW_CORE_SRC = worker/workflow.c worker/wf-claim.c worker/wf-claim-row.c worker/wf-record.c worker/wf-beat.c worker/wf-state.c worker/pgpool.c \
    worker/store.c worker/http.c worker/source.c worker/source-shape.c worker/fernet.c
WORKFLOW_SRC = $(WORKFLOW_CORE_SRC) worker/workflow-plugin.c
WORKER_EXE_SRC = $(filter-out $(WORKFLOW_SRC),$(WORKER_SRC))
CTL_SRC = $(wildcard sparkctl/*.c)

obj = $(patsubst %.c,$(BUILD)/obj/%.o,$(1))
# position-independent copies for the plugin
pic = $(patsubst %.c,$(BUILD)/pic/%.o,$(1))

BINS = $(BUILD)/bin/sparkd $(BUILD)/bin/spark-worker $(BUILD)/bin/sparkctl $(BUILD)/bin/spark-workflow.so

.PHONY: fuzz fuzz-build chaos all test test-unit test-integration run deps install uninstall clean format lint bench check-format

all: $(BINS)

$(BUILD)/obj/common/%.o: common/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS_ALL) $(CFLAGS_ALL) $(call PC,$(PKGS_COMMON) msgpack) -MMD -MP -c $< -o $@
$(BUILD)/obj/proto/%.o: proto/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS_ALL) $(CFLAGS_ALL) $(call PC,msgpack) -MMD -MP -c $< -o $@
$(BUILD)/obj/sparkd/%.o: sparkd/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS_ALL) -Isparkd $(CFLAGS_ALL) $(call PC,$(PKGS_SPARKD)) -MMD -MP -c $< -o $@
$(BUILD)/obj/worker/%.o: worker/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS_ALL) -Iworker $(CFLAGS_ALL) $(call PC,$(PKGS_WORKER) $(PKGS_WORKFLOW)) -MMD -MP -c $< -o $@
# hidden visibility: the plugin exports spark_workflow_plugin only (workflow-plugin.c)
$(BUILD)/pic/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS_ALL) -Iworker $(CFLAGS_ALL) -fPIC -fvisibility=hidden $(call PC,$(PKGS_WORKFLOW)) -MMD -MP \
	    -c $< -o $@
# an archive, so the plugin takes only the common/ objects it uses
$(BUILD)/pic/libcommon.a: $(call pic,$(COMMON_SRC))
	rm -f $@
	$(AR) rcs $@ $^
$(BUILD)/obj/sparkctl/%.o: sparkctl/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS_ALL) -Isparkctl $(CFLAGS_ALL) $(call PC,$(PKGS_CTL)) -MMD -MP -c $< -o $@

$(BUILD)/bin/sparkd: $(call obj,$(SPARKD_SRC) $(COMMON_SRC) $(PROTO_SRC))
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(LDFLAGS) -o $@ $^ $(call PL,$(PKGS_SPARKD)) -lm
$(BUILD)/bin/spark-worker: $(call obj,$(WORKER_EXE_SRC) $(COMMON_SRC))
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(LDFLAGS) -o $@ $^ $(call PL,$(PKGS_WORKER)) -lm
$(BUILD)/bin/spark-workflow.so: $(call pic,$(WORKFLOW_SRC)) $(BUILD)/pic/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(LDFLAGS) -shared -Wl,-z,defs -o $@ $^ $(call PL,$(PKGS_WORKFLOW)) -lm
$(BUILD)/bin/sparkctl: $(call obj,$(CTL_SRC) $(COMMON_SRC) $(PROTO_SRC))
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(LDFLAGS) -o $@ $^ $(call PL,$(PKGS_CTL))
	ln -sf sparkctl $(BUILD)/bin/automagik-spark

-include $(shell find $(BUILD)/obj $(BUILD)/pic -name '*.d' 2>/dev/null)

# ---- unit tests (cmocka): tests/unit/test_<name>.c, linked with common/, proto/ and worker/ sources except main ----
# (and except workflow-loader.c: the tests link the workflow code itself)
UNIT_SRC = $(wildcard tests/unit/test_*.c)
UNIT_BINS = $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(UNIT_SRC))
WORKER_LIB_SRC = $(filter-out worker/main.c,$(WORKER_SRC))
SPARKD_LIB_SRC = $(filter-out sparkd/main.c,$(SPARKD_SRC))
UNIT_PKGS = $(PKGS_WORKER) $(PKGS_WORKFLOW) $(PKGS_SPARKD) cmocka

$(BUILD)/obj/tests/unit/%.o: tests/unit/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS_ALL) -Iworker -Isparkd $(CFLAGS_ALL) $(call PC,$(UNIT_PKGS)) -MMD -MP -c $< -o $@
$(BUILD)/tests/%: $(BUILD)/obj/tests/unit/%.o $(call obj,$(COMMON_SRC) $(PROTO_SRC) $(WORKER_LIB_SRC) $(SPARKD_LIB_SRC))
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(LDFLAGS) -o $@ $^ $(call PL,$(UNIT_PKGS)) -lm

# sparkctl's pure helpers (tests/unit/test_sparkctl_*.c): linked with sparkctl/ except main.c, common/ and proto/,
# never with sparkd's or the worker's objects. The longer pattern wins over the rule above (shortest stem).
CTL_LIB_SRC = $(filter-out sparkctl/main.c,$(CTL_SRC))
$(BUILD)/tests/test_sparkctl_%: $(BUILD)/obj/tests/unit/test_sparkctl_%.o $(call obj,$(COMMON_SRC) $(PROTO_SRC) $(CTL_LIB_SRC))
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(LDFLAGS) -o $@ $^ $(call PL,$(PKGS_CTL) cmocka)

test-unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; $$t; done

# The workflow plugin's driver (tests/driver/wf_async.c): an event loop running workflow tasks through the plugin's
# sources linked directly, for tests/integration/test_workflow_async.py.
WF_DRIVER = $(BUILD)/tests/wf-async-driver
$(BUILD)/obj/tests/driver/%.o: tests/driver/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS_ALL) -Iworker $(CFLAGS_ALL) $(call PC,$(PKGS_WORKFLOW)) -MMD -MP -c $< -o $@
$(WF_DRIVER): $(BUILD)/obj/tests/driver/wf_async.o $(call obj,$(WORKFLOW_SRC) $(COMMON_SRC))
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(LDFLAGS) -o $@ $^ $(call PL,$(PKGS_WORKFLOW)) -lm

test-integration: $(BINS) $(WF_DRIVER)
	SPARK_BIN_DIR=$(abspath $(BUILD)/bin) SPARK_SAN=$(SAN) $(PYTHON) -m pytest -q -p no:cacheprovider tests/integration $(PYTEST_ARGS)

test: deps
	$(MAKE) all
	$(MAKE) test-unit
	$(MAKE) test-integration

deps:
	@sh scripts/deps.sh

run: deps all
	@sh scripts/run.sh $(abspath $(BUILD)/bin)

bench: deps all
	@sh bench/run.sh $(abspath $(BUILD)/bin) $(BENCH_ARGS)

install: all
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SBINDIR)
	install -m 0755 $(BUILD)/bin/sparkd $(DESTDIR)$(SBINDIR)/sparkd
	install -m 0755 $(BUILD)/bin/spark-worker $(DESTDIR)$(SBINDIR)/spark-worker
	install -d $(DESTDIR)$(PREFIX)/lib/spark
	install -m 0644 $(BUILD)/bin/spark-workflow.so $(DESTDIR)$(PREFIX)/lib/spark/spark-workflow.so
	install -m 0755 $(BUILD)/bin/sparkctl $(DESTDIR)$(BINDIR)/sparkctl
	ln -sf sparkctl $(DESTDIR)$(BINDIR)/automagik-spark
	sh scripts/install-extras.sh "$(DESTDIR)" "$(PREFIX)"

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/sparkd $(DESTDIR)$(SBINDIR)/spark-worker $(DESTDIR)$(BINDIR)/sparkctl \
	    $(DESTDIR)$(BINDIR)/automagik-spark $(DESTDIR)$(PREFIX)/lib/spark/spark-workflow.so

clean:
	rm -rf build build-san

FORMAT_SRC = $(wildcard common/*.[ch] proto/*.[ch] sparkd/*.[ch] worker/*.[ch] sparkctl/*.[ch] tests/unit/*.c tests/driver/*.c tests/fuzz/*.c)
format:
	clang-format -i $(FORMAT_SRC)
check-format:
	clang-format --dry-run -Werror $(FORMAT_SRC)
# cppcheck reads no system headers: it is given <sys/queue.h> (wherever this system keeps it), whose TAILQ_FOREACH
# it otherwise cannot parse, and so reported the loop variables as uninitialised
QUEUE_H = $(shell $(CC) -M -E -x c /dev/null -include sys/queue.h 2>/dev/null | tr ' \\' '\n\n' | grep 'sys/queue\.h$$' | head -n 1)
lint:
	cppcheck --quiet --error-exitcode=1 --enable=warning,portability --inline-suppr \
	    --suppress=missingIncludeSystem -D__GNUC__ -Icommon -Iproto $(if $(QUEUE_H),--include=$(QUEUE_H)) $(FORMAT_SRC)

# ---- fuzzing (libFuzzer: clang and libclang-rt-14-dev, which make deps installs) ----
#   make fuzz                    every target for FUZZ_SECONDS each (seed corpus: tests/fuzz/<target>/)
#   make fuzz FUZZ_SECONDS=15 FUZZ_TARGETS="report url"
# Each target is linked with the parser's own files only; the working corpus and any crash input stay in
# build/fuzz/ (tests/fuzz/run.sh prints executions per target and fails on a finding).
FUZZ_SECONDS ?= 60
FUZZ_CC ?= clang
FUZZ_DIR = build/fuzz
FUZZ_TARGETS ?= proto message envfile url fernet report command source
FUZZ_PKGS = msgpack jansson hiredis libevent libcurl libcrypto
FUZZ_CFLAGS = -std=c11 -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -D_GNU_SOURCE -Icommon -Iproto \
    -Iworker $(call PC,$(FUZZ_PKGS))
FUZZ_SRC_proto = proto/proto.c
FUZZ_SRC_message = worker/message.c worker/message-codec.c worker/jscan.c common/codec.c common/util.c common/log.c
FUZZ_SRC_envfile = common/config.c common/config-socket.c common/envfile.c common/rundir.c common/url.c common/util.c common/log.c
FUZZ_SRC_url = common/url.c common/util.c common/log.c
FUZZ_SRC_fernet = worker/fernet.c common/util.c common/log.c
FUZZ_SRC_report = common/report.c common/wireline.c common/util.c common/log.c
FUZZ_SRC_command = common/command.c common/wireline.c common/util.c common/log.c
FUZZ_SRC_source = worker/source-shape.c common/util.c common/log.c
$(FUZZ_DIR)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -MMD -MP -c $< -o $@
define FUZZ_RULE
$(FUZZ_DIR)/fuzz_$(1): $(FUZZ_DIR)/obj/tests/fuzz/fuzz_$(1).o $(patsubst %.c,$(FUZZ_DIR)/obj/%.o,$(FUZZ_SRC_$(1)))
	$(FUZZ_CC) -fsanitize=fuzzer,address,undefined -o $$@ $$^ $(call PL,$(FUZZ_PKGS)) -lm
endef
$(foreach t,$(FUZZ_TARGETS),$(eval $(call FUZZ_RULE,$(t))))
-include $(shell find $(FUZZ_DIR)/obj -name '*.d' 2>/dev/null)
fuzz-build: $(patsubst %,$(FUZZ_DIR)/fuzz_%,$(FUZZ_TARGETS))
fuzz: deps
	$(MAKE) fuzz-build
	@sh tests/fuzz/run.sh $(FUZZ_DIR) $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# ---- chaos: kill -9 of workers and of sparkd, Redis and PostgreSQL restarts under a Celery producer ----
#   make chaos                   CHAOS_SECONDS (default 60) of faults, then the drain and the verdict
#   make chaos CHAOS_SECONDS=600 CHAOS_ARGS="--seed 42 --keep"
CHAOS_SECONDS ?= 60
chaos: deps all
	SPARK_SAN=$(SAN) $(PYTHON) tests/chaos/chaos.py --bin-dir $(abspath $(BUILD)/bin) --seconds $(CHAOS_SECONDS) \
	    $(CHAOS_ARGS)
