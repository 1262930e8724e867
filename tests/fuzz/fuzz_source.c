/*
 * libFuzzer harness for a workflow source's HTTP reply, as source.c handles it: the body parsed with jansson
 * (JSON_DECODE_ANY, as parse_reply does), then shaped by every reader: the automagik-agents output, the Hive
 * listing lookup and the Hive run output of each kind.
 */
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "source.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	json_error_t jerr;
	json_t *reply = json_loadb((const char *)data, size, JSON_DECODE_ANY, &jerr);
	if (reply == NULL)
		return 0;
	json_decref(source_agents_output(reply));
	source_hive_list_has(reply, "a1");
	if (json_is_array(reply)) {
		size_t i;
		json_t *item;
		json_array_foreach(reply, i, item)
		{
			source_hive_item_id(item);
		}
	}
	static const enum hive_kind kinds[] = {HIVE_NONE, HIVE_AGENT, HIVE_TEAM, HIVE_WORKFLOW};
	for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
		bool ok = true;
		json_t *out = source_hive_output(kinds[k], reply, &ok);
		if (!json_is_string(out))
			abort(); /* source.h: always a JSON string */
		json_decref(out);
	}
	json_decref(reply);
	return 0;
}
