"""The control protocol's replies have one shape (issue 8 item 6): every map sparkd sends has exactly the fields of
its list in proto/fields.h, whatever the state, so map sizes are derived from the lists and clients need not guess."""

import os
import re
import signal

from harness import REPO, RpcClient, t, wait_for

FIELDS_H = (REPO / "proto" / "fields.h").read_text()
PROTO_H = (REPO / "proto" / "proto.h").read_text()


def field_lists():
    names = dict(re.findall(r'#define\s+(PROTO_[FN]_\w+)\s+"([^"]+)"', FIELDS_H + PROTO_H))
    text = FIELDS_H.replace("\\\n", " ")
    lists = {}
    for m in re.finditer(r"#define\s+PROTO_(\w+)_FIELDS\(X\)\s+(.*)", text):
        lists[m.group(1)] = [names[x] for x in re.findall(r"X\((\w+)\)", m.group(2))]
    return lists


LISTS = field_lists()


def keys(m, which):
    assert isinstance(m, dict), (which, m)
    assert sorted(m) == sorted(LISTS[which]), (which, sorted(m), sorted(LISTS[which]))


def check_status(st, with_procs):
    keys(st, "STATUS")
    keys(st["supervisor"], "SUPERVISOR")
    keys(st["supervisor"]["limits"], "LIMITS")
    assert st["truncated"] is False
    for w in st["workers"]:
        keys(w, "WORKER")
        if not with_procs:
            assert w["processes"] is None
            continue
        for p in w["processes"]:
            keys(p, "PROCESS")
            for task in p["active_tasks"]:
                keys(task, "TASK")
            if p["last_exit"] is not None:
                keys(p["last_exit"], "EXIT")


def test_every_reply_map_has_exactly_its_listed_fields(spark, celery):
    assert len(LISTS) >= 12, LISTS
    sd = spark()
    sd.start(workers=1, concurrency=2)
    with RpcClient(sd.socket, timeout=t(5)) as c:
        err, res = c.call("ping")
        assert err is None
        keys(res, "PING")
        # before any queue length is known, and with no exit yet: the same fields, nil
        err, st = c.call("status", {"verbose": True})
        assert err is None
        check_status(st, True)
        err, st = c.call("status", {"verbose": False})
        assert err is None
        check_status(st, False)
        err, _ = c.call("status", {"verbose": 3})
        keys(err, "ERROR")
        err, res = c.call("logs", {"lines": 5})
        assert err is None
        keys(res, "LOGS")
        assert res["lines"]
        for line in res["lines"]:
            keys(line, "LOG_LINE")

    # a running task, a crash (last exit) and known queue lengths: still the same fields
    app = celery()
    r = app.send_task("spark.sleep", args=[2])
    wait_for(lambda: any(p["active_tasks"] for p in sd.processes()), t(10), what="a running task")
    idle = [p for p in sd.processes() if not p["active_tasks"]][0]
    os.kill(idle["pid"], signal.SIGKILL)
    st = wait_for(lambda: (lambda s: s if any(p["last_exit"] for p in sd.processes(s)) and
                           s["supervisor"]["queue_lengths"] is not None else None)(sd.status()), t(15),
                  what="a last exit and queue lengths")
    check_status(st, True)
    assert any(p["active_tasks"] for p in sd.processes(st)) or r.get(timeout=t(10)) == 2
    with RpcClient(sd.socket, timeout=t(5)) as c:
        err, res = c.call("stop", {"timeout_s": 10})
        assert err is None
        keys(res, "STOP")
