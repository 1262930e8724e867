"""docs/protocol.md (issue 4): its example client runs against a live sparkd, and the doc names every method,
notification, error code and result field that the code defines, so it cannot silently fall behind."""

import gc
import re
import subprocess

from harness import PYTHON, REPO, base_env, t, wait_for

DOC = REPO / "docs" / "protocol.md"
EXAMPLE = REPO / "docs" / "examples" / "spark_status.py"


def proto_names(prefix):
    """The wire names #defined in proto/proto.h and proto/fields.h under PROTO_<prefix>_*."""
    text = (REPO / "proto" / "proto.h").read_text() + (REPO / "proto" / "fields.h").read_text()
    return dict(re.findall(rf'#define\s+(PROTO_{prefix}_\w+)\s+"([^"]+)"', text))


def run_example(*args, env=None):
    return subprocess.run([PYTHON, str(EXAMPLE), *map(str, args)], capture_output=True, text=True,
                          env=base_env(env), timeout=t(30))


def parse_example_output(out):
    rows = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(\S+)\s+(\S+)\s+processed=(\d+)", line.strip())
        assert m, f"unexpected line from the example client: {line!r}\n{out}"
        rows[m.group(1)] = (m.group(2), int(m.group(3)))
    return rows


def test_example_client_prints_live_status(spark, celery):
    sd = spark()
    sd.start(workers=2, concurrency=1)
    app = celery()
    results = [app.send_task("spark.noop", args=[i]) for i in range(6)]
    assert [r.get(timeout=t(20)) for r in results] == list(range(6))
    del results
    gc.collect()  # AsyncResults are in cycles: release them while the broker is up
    # the results are published before the workers' reports of them reach sparkd: wait for the count
    st = wait_for(lambda: (lambda s: s if sum(w["processed"] for w in s["workers"]) == 6 else None)(sd.status()),
                  t(5), what="6 tasks processed")
    expected = {w["name"]: (w["state"], w["processed"]) for w in st["workers"]}
    assert len(expected) == 2, st

    # the socket as an argument
    r = run_example(sd.socket)
    assert r.returncode == 0, r.stderr
    assert parse_example_output(r.stdout) == expected, r.stdout
    assert all(state == "active" for state, _ in expected.values())

    # the socket from $SPARK_SOCKET, as sparkctl resolves it
    r = run_example(env={"SPARK_SOCKET": sd.socket})
    assert r.returncode == 0, r.stderr
    assert parse_example_output(r.stdout) == expected, r.stdout

    # no daemon: a one-line error naming the socket, non-zero exit, no traceback
    sd.stop()
    r = run_example(sd.socket)
    assert r.returncode != 0 and str(sd.socket) in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_doc_embeds_the_example_verbatim():
    doc = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert EXAMPLE.read_text() in blocks, \
        "docs/protocol.md must embed docs/examples/spark_status.py verbatim (one ```python block)"
    # a stock msgpack library and the standard library only
    imports = set(re.findall(r"^(?:import|from)\s+(\w+)", EXAMPLE.read_text(), re.M))
    assert imports <= {"os", "socket", "sys", "msgpack"}, imports


def test_doc_names_every_method_notification_and_error_code():
    doc = DOC.read_text()
    names = {**proto_names("M"), **proto_names("N"), **proto_names("E")}
    assert len(proto_names("M")) >= 4 and len(proto_names("E")) >= 5, names
    missing = [f"{macro} ({name})" for macro, name in names.items() if f"`{name}`" not in doc]
    assert not missing, f"docs/protocol.md does not document: {', '.join(missing)}"
    # each error code gets its own row saying when it is sent
    for code in proto_names("E").values():
        assert re.search(rf"^\|\s*`{re.escape(code)}`\s*\|", doc, re.M), f"no row for error code {code}"
    # each method gets its own section
    for m in proto_names("M").values():
        assert re.search(rf"^###\s+`{re.escape(m)}`", doc, re.M), f"no section for method {m}"
    version = re.search(r"#define\s+SPARK_PROTOCOL_VERSION\s+(\d+)", (REPO / "proto" / "proto.h").read_text())
    assert f"protocol version **{version.group(1)}**" in doc


def test_doc_names_every_field_sparkd_sends_and_reads():
    """Every key sparkd packs into a result or notification, and every parameter it reads, appears in the doc; the
    names come from proto/ alone (sparkd spells none of them itself)."""
    doc = DOC.read_text()
    src = "\n".join(p.read_text() for p in sorted((REPO / "sparkd").glob("*.c")))
    spelled = set(re.findall(r'proto_(?:pack_(?:kv_\w+|key)|get_\w+|map_get)\(\s*&?\w+(?:->\w+)?\s*,\s*"(\w+)"', src))
    assert not spelled, f"sparkd spells wire names that belong in proto/fields.h or proto.h: {sorted(spelled)}"
    sent = set(proto_names("F").values())
    read = set(proto_names("P").values())
    assert len(sent) > 20 and {"verbose", "lines", "follow", "force"} <= read, (sent, read)
    missing = sorted(k for k in sent | read if f"`{k}`" not in doc)
    assert not missing, f"docs/protocol.md does not mention these fields/parameters: {missing}"
