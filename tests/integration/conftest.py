"""Fixtures for the integration tests (see harness.py for the pieces).

  redis_server   module-scoped private redis-server (restartable on its port: redis_server.restart())
  redis          the module's server, flushed before the test
  redis_factory  make(**kw) -> a fresh private RedisServer owned by the test
  postgres       session-scoped private PostgreSQL from pgserver.py (.url)
  spark          make(env=None, name="spark", broker=True) -> harness.Sparkd with CELERY_BROKER_URL and
                 CELERY_RESULT_BACKEND pointing at the module's redis (unless broker=False); every process it
                 started is killed at teardown, and sanitizer reports fail the test
  celery         make(url=None) -> a Python Celery app on the module's redis
"""

import importlib
import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import RedisServer, Sparkd, celery_app, t  # noqa: E402

# A hung test must not hang CI: each test gets an alarm (scaled under sanitizers).
TEST_TIMEOUT = int(os.environ.get("SPARK_TEST_TIMEOUT", "0")) or int(t(120))


def pytest_configure(config):
    # Debian's kombu/celery use deprecated importlib APIs: not ours to fix
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning")


class TestTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    def on_alarm(signum, frame):
        raise TestTimeout(f"test exceeded {TEST_TIMEOUT}s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session", autouse=True)
def _binaries():
    missing = [n for n in ("sparkd", "spark-worker", "sparkctl") if not harness.have_binaries(n)]
    if missing:
        pytest.fail(f"binaries missing in {harness.BIN_DIR}: {', '.join(missing)} (run make, or set SPARK_BIN_DIR)",
                    pytrace=False)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
def redis(redis_server):
    if not redis_server.running():
        redis_server.start()
    redis_server.client().flushall()
    return redis_server


@pytest.fixture
def redis_factory(tmp_path):
    servers = []

    def make(port=None):
        srv = RedisServer(tmp_path / f"redis{len(servers)}", port=port).start()
        servers.append(srv)
        return srv
    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def spark(request, tmp_path):
    instances = []

    def make(env=None, name=None, broker=True, bin_dir=None):
        e = {}
        if broker:
            srv = request.getfixturevalue("redis")
            e["CELERY_BROKER_URL"] = srv.url(0)
            e["CELERY_RESULT_BACKEND"] = srv.url(1)
        e.update(env or {})
        sd = Sparkd(tmp_path, e, bin_dir=bin_dir, name=name or f"spark{len(instances)}")
        instances.append(sd)
        return sd
    yield make
    reports = []
    for sd in instances:
        reports += sd.cleanup()
    if reports:
        pytest.fail("sanitizer reports:\n" + "\n".join(reports), pytrace=False)


@pytest.fixture
def celery(request):
    apps = []
    # Celery's apps share kombu's process-wide connection pools (kombu.pools, keyed by broker URL): a connection
    # pooled by an earlier test outlives a redis-server restart on the same port and fails the next app's first
    # drain ("Connection closed by server"). Every test starts and ends with empty pools.
    from kombu import pools
    pools.reset()

    def make(broker_url=None, backend_url=None):
        srv = request.getfixturevalue("redis")
        app = celery_app(broker_url or srv.url(0), backend_url or srv.url(1))
        apps.append(app)
        return app
    yield make
    for app in apps:
        # drop the result subscription while Redis is still up: AsyncResult.__del__ would reconnect later
        try:
            rc = app.backend.result_consumer
            if getattr(rc, "_pubsub", None) is not None:
                rc._pubsub.close()
                rc._pubsub = None
        except Exception:
            pass
        try:
            app.close()
        except Exception:
            pass
    pools.reset()


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL (tests/integration/pgserver.py, written with the workflow module)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.exists(os.path.join(here, "pgserver.py")):
        pytest.skip("pgserver.py not present")
    pgserver = importlib.import_module("pgserver")
    srv = pgserver.PgServer()  # its own temp dir, reachable by the postgres user, removed at stop
    srv.start()
    yield srv
    srv.stop()
