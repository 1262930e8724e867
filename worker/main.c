/* spark-worker: the worker process sparkd runs (also usable by hand for debugging). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "url.h"
#include "util.h"
#include "worker.h"

static void
usage(FILE *f)
{
	fprintf(f, "usage: spark-worker [--name NODE] [--slots N] [--index I] [--env-file FILE]\n"
	           "       spark-worker --migrate | --version | --help\n"
	           "\n"
	           "Consumes Celery tasks from CELERY_BROKER_URL (queues SPARK_QUEUES), runs them in N slots and\n"
	           "stores results in CELERY_RESULT_BACKEND. Normally started by sparkd; configuration comes from\n"
	           "the environment and the env file (see sparkctl --help).\n"
	           "  --name NODE    node name (default celery@HOST)\n"
	           "  --slots N      concurrent tasks in this process (default: CELERY_WORKER_CONCURRENCY for the\n"
	           "                 threads pool, else 1)\n"
	           "  --index I      pool child number, used in the log tag (ForkPoolWorker-I)\n"
	           "  --migrate      apply the database migrations and exit\n");
}

int
main(int argc, char **argv)
{
	static const struct option opts[] = {
	    {"name", required_argument, NULL, 'n'},  {"slots", required_argument, NULL, 's'},
	    {"index", required_argument, NULL, 'i'}, {"env-file", required_argument, NULL, 'e'},
	    {"migrate", no_argument, NULL, 'm'},     {"version", no_argument, NULL, 'V'},
	    {"help", no_argument, NULL, 'h'},        {NULL, 0, NULL, 0},
	};
	const char *name = NULL, *env_file = NULL;
	long slots = 0, index = -1;
	bool migrate = false;
	int c;
	while ((c = getopt_long(argc, argv, "n:s:i:e:mVh", opts, NULL)) != -1) {
		switch (c) {
		case 'n':
			name = optarg;
			break;
		case 's':
			if (parse_long(optarg, &slots) < 0 || slots < 1 || slots > 4096) {
				fprintf(stderr, "spark-worker: --slots %s: expected a number from 1 to 4096\n", optarg);
				return 2;
			}
			break;
		case 'i':
			if (parse_long(optarg, &index) < 0 || index < 0 || index > 100000) {
				fprintf(stderr, "spark-worker: --index %s: expected a number from 0\n", optarg);
				return 2;
			}
			break;
		case 'e':
			env_file = optarg;
			break;
		case 'm':
			migrate = true;
			break;
		case 'V':
			printf("spark-worker %s\n", SPARK_VERSION);
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "spark-worker: unexpected argument '%s' (see --help)\n", argv[optind]);
		return 2;
	}

	struct spark_config cfg;
	char err[512];
	if (config_load(&cfg, NULL, 0, env_file, err, sizeof err) < 0) {
		fprintf(stderr, "spark-worker: %s\n", err);
		return 2;
	}
	if (migrate) {
		int rc = workflow_migrate(&cfg);
		config_free(&cfg);
		return rc;
	}
	if (slots == 0)
		slots = cfg.pool == SPARK_POOL_THREADS ? cfg.concurrency : 1;
	char *node = name ? xstrdup(name) : xasprintf("celery@%s", spark_hostname());
	char *tag = index >= 0 ? xasprintf("ForkPoolWorker-%ld", index) : xstrdup(node);
	log_init(tag, cfg.loglevel);
	char *redacted = url_redact(cfg.broker_url);
	log_info("spark-worker %s starting: node %s, broker %s, %ld slot%s, pool %s", SPARK_VERSION, node, redacted,
	         slots, slots == 1 ? "" : "s", pool_name(cfg.pool));
	free(redacted);

	struct worker w;
	engine_init(&w, &cfg, node, (int)slots);
	int rc = engine_run(&w);
	engine_free(&w);
	free(tag);
	free(node);
	config_free(&cfg);
	return rc;
}
