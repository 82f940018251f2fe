/* aegaeon tensor-parallel slices: which part of each tensor a rank loads. */
#ifndef AEGAEON_SLICE_H
#define AEGAEON_SLICE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * A slice spec tells a load (aeg_prefetch_options, aeg_load_request) to
 * bring only rank @rank's part of each tensor of a safetensors file onto
 * the GPU: the tensors a rule splits are cut along one dimension into
 * @world parts, rank r taking part r; every other tensor is loaded whole
 * (replicated on every rank). Each rank's part of a tensor lies contiguous
 * in the slab, with its sliced shape in the tensor table.
 *
 * Rules are tried in order, then the preset's; the first whose pattern
 * matches a tensor's name (fnmatch(3), no flags: '*' matches dots too)
 * decides. A dimension must exist in every tensor its rule matches, and
 * must split evenly (its extent a multiple of @world) unless
 * AEG_SLICE_UNEVEN is set: then each rank takes ceil(extent / world)
 * along it, the last ranks less, possibly nothing, as fastsafetensors
 * splits and as a vocabulary padded to a multiple of the ranks leaves it.
 */
#define AEG_SLICE_WHOLE (-1)            /* a rule's dim: the tensor is loaded whole by every rank */
#define AEG_SLICE_MAX_WORLD 4096
#define AEG_SLICE_MAX_RULES 64
#define AEG_SLICE_PATTERN_MAX 256       /* a pattern's bytes, NUL included */

#define AEG_SLICE_UNEVEN 0x1u

struct aeg_slice_rule {
	const char *pattern;            /* e.g. "*.q_proj.weight" */
	int dim;                        /* 0..ndim-1, or AEG_SLICE_WHOLE */
};

/*
 * Presets: the column- and row-parallel split of Megatron-LM and vLLM over
 * the tensor names of Hugging Face checkpoints.
 * MEGATRON: column-parallel weights and their biases by output rows
 * (dim 0): q_proj, k_proj, v_proj, gate_proj, up_proj, Mixtral's experts'
 * w1 and w3, dense_h_to_4h, fc1; row-parallel weights by input columns
 * (dim 1): o_proj, down_proj, experts' w2, dense_4h_to_h, fc2, out_proj,
 * attention.dense, self_attention.dense, their biases whole; embeddings
 * and the LM head by vocabulary rows (dim 0): embed_tokens, embed_in,
 * word_embeddings, lm_head, embed_out. Norms, routers and everything else
 * whole. Fused projections (query_key_value, qkv_proj, c_attn) are loaded
 * whole: their parts interleave, so no one slice of them is a rank's.
 */
enum aeg_slice_preset {
	AEG_SLICE_PRESET_NONE = 0,      /* the rules only */
	AEG_SLICE_PRESET_MEGATRON = 1,
};

struct aeg_slice {
	int rank;                       /* 0..world-1 */
	int world;                      /* 1..AEG_SLICE_MAX_WORLD */
	enum aeg_slice_preset preset;
	const struct aeg_slice_rule *rules;     /* tried before the preset's */
	uint32_t nrules;                /* 0..AEG_SLICE_MAX_RULES */
	unsigned flags;                 /* AEG_SLICE_* */
};

/* aeg_slice_preset_name - "none", "megatron"; "unknown" otherwise. */
const char *aeg_slice_preset_name(enum aeg_slice_preset preset);

/* aeg_slice_preset_parse - "none" or "megatron" (also "vllm"); AEG_EINVAL naming the choices otherwise. */
int aeg_slice_preset_parse(const char *name, enum aeg_slice_preset *preset);

/*
 * aeg_slice_check - check a spec on its own (a file's tensors are checked
 * when it loads): rank within world, the preset, flags, the rules' count,
 * patterns (non-empty, under AEG_SLICE_PATTERN_MAX bytes) and dims.
 * 0 or AEG_EINVAL with a detail naming the value and its limit.
 */
int aeg_slice_check(const struct aeg_slice *slice);

/*
 * aeg_slice_dim - the dimension @slice splits tensor @name along, or
 * AEG_SLICE_WHOLE; the rule that decided goes to @pattern (may be NULL;
 * NULL when none matched). The spec is not checked.
 */
int aeg_slice_dim(const struct aeg_slice *slice, const char *name, const char **pattern);

#ifdef __cplusplus
}
#endif
#endif
