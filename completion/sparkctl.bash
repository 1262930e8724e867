# bash completion for sparkctl and automagik-spark (the same program; the latter takes the workers guide's
# grammar: automagik-spark workers start|status|stop|logs ...).

_sparkctl_opts_for() {
	case $1 in
	start) echo "--workers --concurrency --pool --loglevel --queues --env-file --foreground" ;;
	status) echo "--verbose --json" ;;
	stop) echo "--force --timeout" ;;
	logs) echo "--follow -f --level --lines -n --worker --json" ;;
	migrate) echo "--env-file" ;;
	esac
}

# COMPREPLY from compgen's words for the current word (cur is the caller's local)
_sparkctl_reply() {
	mapfile -t COMPREPLY < <(compgen "$@" -- "$cur")
}

_sparkctl() {
	local cur prev words cword
	if declare -F _init_completion >/dev/null 2>&1; then
		_init_completion || return
	else
		# without the bash-completion package: the plain variables bash gives us
		cur=${COMP_WORDS[COMP_CWORD]}
		prev=${COMP_WORDS[COMP_CWORD - 1]}
		words=("${COMP_WORDS[@]}")
		cword=$COMP_CWORD
	fi

	local prog=${words[0]##*/}
	local global="--socket --help -h --version"

	# option values first: they do not depend on where we are
	case $prev in
	--pool)
		_sparkctl_reply -W "prefork threads solo"
		return
		;;
	--loglevel | --level)
		_sparkctl_reply -W "debug info warning error critical"
		return
		;;
	--socket | --env-file)
		_sparkctl_reply -f
		compopt -o filenames 2>/dev/null
		return
		;;
	--workers | --concurrency | --timeout | --lines | -n | --queues | --worker)
		return
		;;
	esac

	# the command words typed so far, skipping options and their values
	local i w cmds=() skip=
	for ((i = 1; i < cword; i++)); do
		w=${words[i]}
		if [[ -n $skip ]]; then
			skip=
			continue
		fi
		case $w in
		--socket | --workers | --concurrency | --pool | --loglevel | --queues | --env-file | --timeout | \
			--level | --lines | -n | --worker)
			skip=1
			;;
		-*) ;;
		*) cmds+=("$w") ;;
		esac
	done

	local cmd='' want=''
	if [[ $prog == automagik-spark ]]; then
		case "${cmds[*]}" in
		"") want="workers db" ;;
		workers) want="start status stop logs" ;;
		db) want="migrate" ;;
		"workers "*) cmd=${cmds[1]} ;;
		"db migrate"*) cmd=migrate ;;
		esac
	else
		case "${cmds[*]}" in
		"") want="start status stop logs db" ;;
		db) want="migrate" ;;
		"db migrate"*) cmd=migrate ;;
		*) cmd=${cmds[0]} ;;
		esac
	fi

	if [[ -n $want ]]; then
		if [[ $cur == -* ]]; then
			_sparkctl_reply -W "$global"
		else
			_sparkctl_reply -W "$want"
		fi
		return
	fi
	_sparkctl_reply -W "$(_sparkctl_opts_for "$cmd") --socket --help"
}

complete -F _sparkctl sparkctl automagik-spark
