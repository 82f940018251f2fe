/* The KV cache's cuda backend in a build without CUDA: no cuda device opens, and no cache is made on one. */
#include "config.h"

#include "internal.h"
#include "kv_internal.h"

static int nocuda_init(aeg_kv_t *kv)
{
	(void)kv;
	return aeg_fail(AEG_ENOTSUP, "KV cache on cuda: this build of aegaeon has no CUDA "
			"(configure --with-cuda=DIR)");
}

static void nocuda_fini(aeg_kv_t *kv)
{
	(void)kv;
}

/* Without an init that succeeds there is no cache to move blocks of: move and baseline are never called. */
const struct kv_backend kv_cuda_backend = {
	.name = "cuda",
	.init = nocuda_init,
	.fini = nocuda_fini,
};
