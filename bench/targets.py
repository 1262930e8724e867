"""The issue's targets set beside the measured medians. Reported, never asserted: a benchmark measures, it does
not pass or fail a build."""
from common import summary, table


def _med(res, label, key):
    runs = [x for x in res.get(label, []) if not x.get("error")]
    if key == "idle_rss":
        s = summary([k / 1024 for x in runs for k in x.get("idle_rss", [])])
    else:
        s = summary([x.get(key) for x in runs])
    return s[0] if s else None


def _row(what, value, ok, unit="", digits=0):
    if value is None:
        return [what, "not measured", "—"]
    return [what, f"{value:,.{digits}f}{unit}", "met" if ok(value) else "**not met**"]


def check(drain, workflow, quick):
    rows = []
    if drain is not None:
        t8 = _med(drain, "ours threads W1 C8", "rate")
        c8 = _med(drain, "Celery threads c8", "rate")
        rows += [
            _row("no-op drain, ours threads W1 C8 ≥ 40,000 tasks/s", t8, lambda v: v >= 40000, "/s"),
            _row("… and ≥ 60× Celery threads c8", t8 / c8 if t8 and c8 else None, lambda v: v >= 60, "×", 1),
            _row("no-op drain, ours prefork W1 C2 ≥ 20,000 tasks/s", _med(drain, "ours prefork W1 C2", "rate"),
                 lambda v: v >= 20000, "/s"),
            _row("worker CPU per no-op task ≤ 20 µs (threads W1 C8)", _med(drain, "ours threads W1 C8", "cpu_us"),
                 lambda v: v <= 20, " µs", 1),
            _row("worker CPU per no-op task ≤ 20 µs (prefork W1 C2)", _med(drain, "ours prefork W1 C2", "cpu_us"),
                 lambda v: v <= 20, " µs", 1),
            _row("idle RSS per prefork process ≤ 3 MiB (no workflow plugin)",
                 _med(drain, "ours prefork W1 C2", "idle_rss"), lambda v: v <= 3, " MiB", 1),
        ]
    if workflow is not None:
        label = "ours threads W1 C1024"
        runs = workflow.get(label, [])
        n = runs[0]["n"] if runs else None
        all_done = None
        if runs:
            all_done = sum(1 for x in runs if not x.get("error") and x.get("completed") == x["n"]) / len(runs)
        rows += [
            _row("workflow 2 s, threads W1 C1024: ≥ 900 calls in flight (peak)", _med(workflow, label,
                                                                                    "inflight_peak"),
                 lambda v: v >= 900),
            _row("… ≥ 450 tasks/s", _med(workflow, label, "rate"), lambda v: v >= 450, "/s"),
            _row("… ≤ 8 PostgreSQL connections", _med(workflow, label, "pg"), lambda v: v <= 8),
            _row("… ≤ 2 Redis connections", _med(workflow, label, "redis"), lambda v: v <= 2),
            _row("… ≤ 150 MiB RSS", _med(workflow, label, "rss_mib"), lambda v: v <= 150, " MiB", 1),
            _row(f"… every task recorded `completed` ({n:,} per run)" if n else "… every task recorded `completed`",
                 None if all_done is None else 100 * all_done, lambda v: v == 100, " % of runs"),
        ]
    lines = ["### Against the targets of the issue", ""]
    if quick:
        lines += ["Quick run: small task counts and one run, so these figures are indicative only.", ""]
    return lines + table(["target", "measured (median)", ""], rows)
