#!/bin/sh
# Installs what `make install` puts beside the binaries: man pages, bash completion, systemd units, the example
# env file and the docs. Usage: install-extras.sh DESTDIR PREFIX
set -eu
DESTDIR=$1
PREFIX=$2
MANDIR=$DESTDIR$PREFIX/share/man
DOCDIR=$DESTDIR$PREFIX/share/doc/spark-workers
COMPDIR=$DESTDIR$PREFIX/share/bash-completion/completions
if [ "$PREFIX" = /usr ]; then
	UNITDIR=$DESTDIR/lib/systemd/system
else
	UNITDIR=$DESTDIR$PREFIX/lib/systemd/system
fi
for page in docs/man/*.[0-9]; do
	[ -f "$page" ] || continue
	sec=${page##*.}
	install -d "$MANDIR/man$sec"
	install -m 0644 "$page" "$MANDIR/man$sec/"
done
if [ -f completion/sparkctl.bash ]; then
	install -d "$COMPDIR"
	install -m 0644 completion/sparkctl.bash "$COMPDIR/sparkctl"
	ln -sf sparkctl "$COMPDIR/automagik-spark"
fi
install -d "$UNITDIR" "$DOCDIR"
for u in systemd/*.service systemd/*.socket; do
	# units name the binaries by their installed place
	sed -e "s|/usr/sbin/|$PREFIX/sbin/|g" -e "s|/usr/bin/|$PREFIX/bin/|g" "$u" >"$UNITDIR/$(basename "$u")"
	chmod 0644 "$UNITDIR/$(basename "$u")"
done
install -m 0644 systemd/spark.env.example "$DOCDIR/spark.env.example"
install -m 0644 README.md "$DOCDIR/"
for d in docs/*.md; do
	[ -f "$d" ] && install -m 0644 "$d" "$DOCDIR/"
done
if [ -d docs/examples ]; then
	install -d "$DOCDIR/examples"
	install -m 0644 docs/examples/* "$DOCDIR/examples/"
fi
exit 0
