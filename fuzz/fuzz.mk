# GNU make rules for the libFuzzer targets, run by `make fuzz` from the
# top-level Makefile, which passes CLANG, the dependencies' flags and the
# directories. The library sources are compiled again here with clang and
# the sanitizers (the main build's objects come from $(CC) without them).
top_srcdir ?= .
top_builddir ?= .
# jobopt (the SPANK option values) once the library has src/lib/job/jobopt.c.
FUZZ_TARGETS ?= size config safetensors index jobrec handle proto_frame proto_msg \
	$(if $(wildcard $(top_srcdir)/src/lib/job/jobopt.c),jobopt)

fuzz_dir := $(top_builddir)/fuzz
# The library's layers, a folder each under src/lib/ (docs/architecture.md).
lib_layers := core prefetch kv job agent
obj_dir := $(fuzz_dir)/obj
bin_dir := $(fuzz_dir)/bin

SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_CFLAGS := -std=gnu11 -g -O1 $(SAN) -Wall -Wextra -Wno-unused-parameter \
	-D_GNU_SOURCE -DSYSCONFDIR='"$(sysconfdir)"' -DSBINDIR='"$(sbindir)"' \
	-I$(obj_dir) -I$(top_srcdir)/include $(addprefix -I$(top_srcdir)/src/lib/,$(lib_layers)) $(DEP_CFLAGS)

# The library's sources (LIB_SOURCES, from Makefile.am) but the CUDA ones:
# the parsers need no GPU, and cudart is not built with the sanitizers. The
# linker takes what a target needs. config.h here is the build's, without
# HAVE_CUDA.
LIB_SOURCES ?= $(patsubst $(top_srcdir)/%,%,$(wildcard $(top_srcdir)/src/lib/*/*.c))
lib_srcs := $(addprefix $(top_srcdir)/,$(filter-out %_cuda.c %_fatbin.c,$(filter %.c,$(LIB_SOURCES))))
lib_objs := $(patsubst %.c,$(obj_dir)/%.o,$(notdir $(lib_srcs)))
headers := $(wildcard $(top_srcdir)/include/aegaeon/*.h $(top_srcdir)/src/lib/*/*.h) \
	$(top_srcdir)/fuzz/fuzz.h $(obj_dir)/config.h
bins := $(addprefix $(bin_dir)/fuzz_,$(FUZZ_TARGETS))

all: $(bins)

vpath %.c $(addprefix $(top_srcdir)/src/lib/,$(lib_layers))
$(obj_dir)/%.o: %.c $(headers) | $(obj_dir)
	$(CLANG) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(obj_dir)/config.h: $(top_builddir)/config.h | $(obj_dir)
	printf '#include "%s"\n#undef HAVE_CUDA\n' "$(abspath $<)" >$@

$(obj_dir)/libaegaeon-fuzz.a: $(lib_objs)
	rm -f $@ && $(AR) rcs $@ $^

$(bin_dir)/fuzz_%: $(top_srcdir)/fuzz/fuzz_%.c $(obj_dir)/libaegaeon-fuzz.a $(headers) | $(bin_dir)
	$(CLANG) $(FUZZ_CFLAGS) -fsanitize=fuzzer $< $(obj_dir)/libaegaeon-fuzz.a $(DEP_LIBS) \
		-lpthread -lm -ldl -lrt -o $@

$(obj_dir) $(bin_dir):
	mkdir -p $@

.PHONY: all
.DELETE_ON_ERROR:
