/* The task registry and the built-in tasks on a real event loop (tasks.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <event2/event.h>
#include <string.h>

#include "task.h"
#include "util.h"

static int done_calls;

static void
on_done(struct task_run *run)
{
	done_calls++;
	if (run->base != NULL)
		event_base_loopbreak(run->base);
}

static void
run_init(struct task_run *run, struct event_base *base)
{
	memset(run, 0, sizeof *run);
	run->base = base;
	run->done = on_done;
	run->cancel = &run->cancel_flag;
	run->outcome = TASK_SUCCESS;
	done_calls = 0;
}

static void
test_lookup(void **state)
{
	(void)state;
	bool dom = true;
	assert_ptr_equal(task_lookup("spark.noop", &dom), task_noop);
	assert_false(dom);
	assert_ptr_equal(task_lookup("spark.sleep", &dom), task_sleep);
	assert_true(dom);
	/* the workflow tasks read one UUID from the raw spans: no DOM of the message */
	assert_non_null(task_lookup("automagik_spark.core.tasks.workflow_tasks.execute_workflow", &dom));
	assert_false(dom);
	dom = true;
	assert_non_null(task_lookup("spark.run_task", &dom));
	assert_false(dom);
	assert_null(task_lookup("spark.nope", &dom));
	assert_null(task_lookup(NULL, &dom));
}

static void
test_noop_copies_arg0_through(void **state)
{
	(void)state;
	struct task_run run;
	run_init(&run, NULL);
	const char *arg0 = "{\"a\": [1, 2.50, \"h\\u00e9\"]}";
	run.arg0_json = arg0;
	run.arg0_len = strlen(arg0);
	task_noop(&run);
	assert_int_equal(done_calls, 1);
	assert_int_equal(run.outcome, TASK_SUCCESS);
	assert_ptr_equal(run.result_json, arg0); /* the bytes themselves, not a re-encoding */
	assert_int_equal(run.result_len, strlen(arg0));
}

static void
test_noop_kwargs_and_missing(void **state)
{
	(void)state;
	struct task_run run;
	run_init(&run, NULL);
	run.kwargs_json = "{\"x\": 7}";
	run.kwargs_len = strlen(run.kwargs_json);
	task_noop(&run);
	assert_int_equal(run.outcome, TASK_SUCCESS);
	assert_int_equal(json_integer_value(run.result), 7);
	json_decref(run.result);

	run_init(&run, NULL);
	run.kwargs_json = "{}";
	run.kwargs_len = 2;
	task_noop(&run);
	assert_int_equal(done_calls, 1);
	assert_int_equal(run.outcome, TASK_FAILURE);
	assert_string_equal(run.exc_type, "TypeError");
}

static void
test_sleep_waits_on_the_loop(void **state)
{
	(void)state;
	struct event_base *base = event_base_new();
	struct task_run run;
	run_init(&run, base);
	run.args = json_pack("[f]", 0.05);
	double t0 = now_mono();
	task_sleep(&run);
	assert_int_equal(done_calls, 0); /* it returned at once: the loop does the waiting */
	event_base_dispatch(base);
	assert_int_equal(done_calls, 1);
	assert_true(now_mono() - t0 >= 0.045);
	assert_int_equal(run.outcome, TASK_SUCCESS);
	assert_true(json_number_value(run.result) == 0.05);
	json_decref(run.result);
	json_decref(run.args);
	event_base_free(base);
}

static void
test_sleep_cancelled_by_the_soft_limit(void **state)
{
	(void)state;
	struct event_base *base = event_base_new();
	struct task_run run;
	run_init(&run, base);
	run.args = json_pack("[i]", 60);
	task_sleep(&run);
	assert_non_null(run.on_cancel);
	atomic_store(&run.cancel_flag, TASK_CANCEL_SOFT_LIMIT);
	run.on_cancel(&run);
	assert_int_equal(done_calls, 1);
	assert_int_equal(run.outcome, TASK_FAILURE);
	assert_string_equal(run.exc_type, "SoftTimeLimitExceeded");
	assert_null(run.on_cancel);
	json_decref(run.args);
	event_base_free(base);
}

static void
test_sleep_bad_arguments(void **state)
{
	(void)state;
	struct task_run run;
	run_init(&run, NULL);
	run.args = json_pack("[s]", "soon");
	task_sleep(&run);
	assert_int_equal(done_calls, 1);
	assert_string_equal(run.exc_type, "TypeError");
	json_decref(run.args);
	run_init(&run, NULL);
	run.args = json_pack("[f]", -1.0);
	task_sleep(&run);
	assert_string_equal(run.exc_type, "ValueError");
	json_decref(run.args);
	run_init(&run, NULL);
	run.args = json_array();
	task_sleep(&run);
	assert_string_equal(run.exc_type, "TypeError");
	json_decref(run.args);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_lookup),
	    cmocka_unit_test(test_noop_copies_arg0_through),
	    cmocka_unit_test(test_noop_kwargs_and_missing),
	    cmocka_unit_test(test_sleep_waits_on_the_loop),
	    cmocka_unit_test(test_sleep_cancelled_by_the_soft_limit),
	    cmocka_unit_test(test_sleep_bad_arguments),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
