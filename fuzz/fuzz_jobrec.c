/* libFuzzer target: the job ready record (aeg_job_record_parse) and the agent's GPU list (aeg_job_gpus_parse). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <aegaeon/jobrec.h>

#include "fuzz.h"

static const int parse_errors[] = { AEG_EPROTO, AEG_ENOMEM, 0 };
static const int gpus_errors[] = { AEG_EINVAL, 0 };

static void check_equal(const struct aeg_job_record *a, const struct aeg_job_record *b)
{
	FUZZ_CHECK(a->version == b->version && a->pid == b->pid && strcmp(a->socket, b->socket) == 0 &&
		   a->device == b->device && a->gpu_count == b->gpu_count &&
		   a->pinned_bytes == b->pinned_bytes && a->pinned_buffer == b->pinned_buffer,
		   "record fields differ after a round trip");
	for (int i = 0; i < a->gpu_count; i++)
		FUZZ_CHECK(a->gpus[i] == b->gpus[i] && a->slabs[i].gpu == b->slabs[i].gpu &&
			   a->slabs[i].bytes == b->slabs[i].bytes &&
			   memcmp(&a->slabs[i].handle, &b->slabs[i].handle, sizeof(aeg_handle_t)) == 0,
			   "slab %d differs after a round trip", i);
}

/* A parsed record formats, and the text parses back to the same record. */
static void check_record(const struct aeg_job_record *rec)
{
	struct aeg_job_record again;
	char *buf = malloc(AEG_JOB_RECORD_MAX);
	size_t len = 0;
	int rc;

	FUZZ_CHECK(buf != NULL, "out of memory");
	FUZZ_CHECK(rec->gpu_count >= 0 && rec->gpu_count <= AEG_JOB_MAX_GPUS, "%d GPUs", rec->gpu_count);
	rc = aeg_job_record_format(rec, buf, AEG_JOB_RECORD_MAX, &len);
	FUZZ_CHECK(rc == 0, "a parsed record does not format: %s", aeg_error_detail());
	rc = aeg_job_record_parse(buf, len, &again);
	FUZZ_CHECK(rc == 0, "a formatted record does not parse: %s", aeg_error_detail());
	check_equal(rec, &again);
	free(buf);
}

static void check_gpus(const char *text)
{
	int gpus[AEG_JOB_MAX_GPUS], again[AEG_JOB_MAX_GPUS], count = -1, count2 = -1, rc;
	char list[AEG_JOB_MAX_GPUS * 6];

	aeg_error_clear();
	rc = aeg_job_gpus_parse(text, gpus, &count);
	if (rc < 0) {
		fuzz_check_error(rc, gpus_errors);
		return;
	}
	FUZZ_CHECK(count >= 0 && count <= AEG_JOB_MAX_GPUS, "%d GPUs from '%s'", count, text);
	for (int i = 0; i < count; i++) {
		FUZZ_CHECK(gpus[i] >= 0 && gpus[i] <= AEG_JOB_MAX_GPU_ORDINAL, "GPU %d from '%s'", gpus[i], text);
		for (int j = 0; j < i; j++)
			FUZZ_CHECK(gpus[i] != gpus[j], "GPU %d twice from '%s'", gpus[i], text);
	}
	rc = aeg_job_gpus_format(gpus, count, list, sizeof(list));
	FUZZ_CHECK(rc == 0, "GPUs of '%s' do not format: %s", text, aeg_error_detail());
	rc = aeg_job_gpus_parse(list, again, &count2);
	FUZZ_CHECK(rc == 0 && count2 == count && memcmp(gpus, again, sizeof(int) * (size_t)count) == 0,
		   "'%s' formatted as '%s' reads back differently", text, list);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct aeg_job_record rec, before;
	char *text;
	int rc;

	memset(&rec, 0xa5, sizeof(rec));
	before = rec;
	aeg_error_clear();
	rc = aeg_job_record_parse((const char *)data, size, &rec);
	if (rc < 0) {
		fuzz_check_error(rc, parse_errors);
		FUZZ_CHECK(memcmp(&rec, &before, sizeof(rec)) == 0, "a failed parse changed the record");
	} else {
		FUZZ_CHECK(rc == 0, "aeg_job_record_parse returned %d", rc);
		check_record(&rec);
	}

	/* The same bytes as a GPU list, as the agent's --gpus and the record's gpus= carry it. */
	if (size <= 512) {
		text = fuzz_cstring(data, size);
		check_gpus(text);
		free(text);
	}
	return 0;
}
