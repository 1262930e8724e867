"""`make install DESTDIR=… PREFIX=/usr` lays out what a Debian package would ship (issue 4): binaries, the
automagik-spark name, man pages that render, bash completion that completes, systemd units, the example env
file and the docs; and the installed binaries run."""

import os
import re
import shlex
import shutil
import stat
import subprocess

import pytest

from harness import REPO, SAN, base_env, t


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    if shutil.which("make") is None:
        pytest.fail("make is required", pytrace=False)
    dest = tmp_path_factory.mktemp("destdir")
    cmd = ["make", "-C", str(REPO), "--no-print-directory", "install", f"DESTDIR={dest}", "PREFIX=/usr"]
    if SAN:
        cmd.append("SAN=1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=t(600))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return dest


def first_existing(*paths):
    for p in paths:
        if p.exists():
            return p
    return None


def man_page(dest, name, section):
    d = dest / "usr" / "share" / "man" / f"man{section}"
    return first_existing(d / f"{name}.{section}", d / f"{name}.{section}.gz")


def unit_dir(dest):
    # Debian 12 keeps units in /lib/systemd/system (merged /usr makes it /usr/lib/systemd/system too)
    return first_existing(dest / "lib" / "systemd" / "system", dest / "usr" / "lib" / "systemd" / "system")


def test_binaries_and_the_automagik_spark_name(staged):
    for rel in ("usr/sbin/sparkd", "usr/sbin/spark-worker", "usr/bin/sparkctl"):
        p = staged / rel
        assert p.is_file() and not p.is_symlink(), f"{rel} missing"
        mode = stat.S_IMODE(os.stat(p).st_mode)
        assert mode & 0o111 == 0o111 and not mode & 0o022, f"{rel} has mode {oct(mode)}"
    alias = staged / "usr/bin/automagik-spark"
    assert alias.exists(), "usr/bin/automagik-spark missing"
    # a relative link (or a copy): it must keep working wherever DESTDIR is unpacked
    if alias.is_symlink():
        assert not os.readlink(alias).startswith("/"), f"absolute link {os.readlink(alias)}"
    assert os.path.realpath(alias) == os.path.realpath(staged / "usr/bin/sparkctl") or \
        alias.read_bytes() == (staged / "usr/bin/sparkctl").read_bytes()


def test_installed_binaries_run(staged):
    env = base_env({"PATH": f"{staged / 'usr/bin'}:{staged / 'usr/sbin'}:/usr/bin:/bin"})
    for rel in ("usr/bin/sparkctl", "usr/bin/automagik-spark", "usr/sbin/sparkd"):
        r = subprocess.run([str(staged / rel), "--version"], capture_output=True, text=True, env=env,
                           timeout=t(30))
        assert r.returncode == 0 and re.search(r"\d+\.\d+\.\d+", r.stdout), f"{rel} --version: {r}"
    r = subprocess.run([str(staged / "usr/sbin/spark-worker"), "--help"], capture_output=True, text=True, env=env,
                       timeout=t(30))
    assert r.returncode == 0 and r.stdout.strip(), r


@pytest.mark.parametrize("name,section", [("sparkctl", 1), ("sparkd", 8), ("spark-worker", 8)])
def test_man_pages_installed_and_render(staged, name, section):
    page = man_page(staged, name, section)
    assert page is not None, f"man page {name}({section}) not installed under usr/share/man/man{section}"
    assert stat.S_IMODE(os.stat(page).st_mode) == 0o644
    if shutil.which("man") is None:
        pytest.fail("man (man-db) is required to check the pages render", pytrace=False)
    env = base_env({"MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80", "MAN_KEEP_FORMATTING": None})
    r = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True, env=env,
                       timeout=t(60))
    assert r.returncode == 0, r.stderr
    assert not r.stderr.strip(), f"{page.name} renders with warnings:\n{r.stderr}"
    assert "NAME" in r.stdout and name in r.stdout and "SYNOPSIS" in r.stdout, r.stdout[:500]
    assert len(r.stdout.splitlines()) > 20, r.stdout


def completion_file(staged):
    d = staged / "usr/share/bash-completion/completions"
    return first_existing(d / "sparkctl", d / "sparkctl.bash")


@pytest.mark.parametrize("prog", ["sparkctl", "automagik-spark"])
def test_bash_completion_completes_subcommands(staged, prog):
    comp = completion_file(staged)
    assert comp is not None, "bash completion for sparkctl not installed under usr/share/bash-completion/completions"
    if prog == "automagik-spark":
        # bash-completion loads completions by command name: the alias needs its own entry
        own = staged / "usr/share/bash-completion/completions/automagik-spark"
        assert own.exists(), "no completion entry named automagik-spark"
        comp = own
    words = {"sparkctl": "sparkctl st", "automagik-spark": "automagik-spark workers st"}[prog]
    script = f"""
set -e
source {shlex.quote(str(comp))}
spec=$(complete -p {prog})
fn=$(printf '%s\\n' "$spec" | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p')
[ -n "$fn" ] || {{ echo "no completion function for {prog}: $spec" >&2; exit 3; }}
COMP_WORDS=({words})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="{words}"
COMP_POINT=${{#COMP_LINE}}
"$fn" {prog} "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True,
                       env=base_env(), timeout=t(30))
    assert r.returncode == 0, r.stderr
    assert not r.stderr.strip(), r.stderr
    assert sorted(r.stdout.split()) == ["start", "status", "stop"], r.stdout


def test_systemd_units_installed(staged):
    d = unit_dir(staged)
    assert d is not None, "no systemd unit directory under DESTDIR"
    for name in ("sparkd.socket", "sparkd.service", "spark-worker-forking.service"):
        p = d / name
        assert p.is_file(), f"{name} not installed in {d.relative_to(staged)}"
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    svc = (d / "sparkd.service").read_text()
    # the installed unit names the installed binaries (PREFIX=/usr)
    assert re.search(r"^ExecStart=/usr/sbin/sparkd\b", svc, re.M), svc
    assert re.search(r"^ExecStop=/usr/bin/sparkctl stop\b", svc, re.M), svc
    assert re.search(r"^Type=notify$", svc, re.M)
    sock = (d / "sparkd.socket").read_text()
    assert re.search(r"^ListenStream=/", sock, re.M) and re.search(r"^SocketMode=0660$", sock, re.M), sock


def test_example_env_file_and_docs(staged):
    doc = staged / "usr/share/doc/spark-workers"
    assert doc.is_dir(), "no usr/share/doc/spark-workers"
    env_example = first_existing(doc / "spark.env.example", doc / "examples" / "spark.env.example",
                                 staged / "etc/spark/spark.env.example")
    assert env_example is not None, "the example env file is not installed"
    assert "CELERY_BROKER_URL" in env_example.read_text()
    for name in ("README.md", "protocol.md", "configuration.md", "operations.md"):
        p = first_existing(doc / name, doc / f"{name}.gz")
        assert p is not None, f"{name} not installed in usr/share/doc/spark-workers"


def test_nothing_installed_outside_prefix_and_no_destdir_leaks(staged):
    top = sorted(p.name for p in staged.iterdir())
    assert set(top) <= {"usr", "lib", "etc"}, f"unexpected top-level entries under DESTDIR: {top}"
    needle = str(staged).encode()
    leaks = []
    for root, _, files in os.walk(staged):
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p):
                if str(staged) in os.readlink(p):
                    leaks.append(p)
                continue
            with open(p, "rb") as fh:
                if needle in fh.read():
                    leaks.append(p)
    assert not leaks, f"installed files mention the DESTDIR: {leaks}"
