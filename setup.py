"""Builds aegaeon_native, one abi3 extension for CPython 3.10 and later, with
the project's own configure and make, so the wheel holds the module that
`make check` tests. The library is linked in statically (cudart too, when
configure finds CUDA); auditwheel bundles hwloc, libconfig and jansson.

Environment: AEGAEON_CONFIGURE_ARGS adds configure options (e.g.
"--without-cuda", "--with-cuda=/opt/cuda"); AEGAEON_BUILD_JOBS sets make -j.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

TOP = os.path.dirname(os.path.abspath(__file__))


def version():
    with open(os.path.join(TOP, "configure.ac")) as f:
        return re.search(r"AC_INIT\(\[aegaeon\], \[([^]]+)\]", f.read()).group(1)


def run(cmd, cwd):
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


class AutotoolsBuild(build_ext):
    """configure --enable-python in the build directory, make the module, copy it."""

    def build_extension(self, ext):
        build = os.path.join(os.path.abspath(self.build_temp), "autotools")
        if os.path.exists(os.path.join(TOP, "config.status")):
            sys.exit("aegaeon: the source tree is configured in place (config.status): "
                     "run 'make distclean' there first, the wheel builds in a directory of its own")
        if not os.path.exists(os.path.join(TOP, "configure")):
            run(["autoreconf", "-fi"], TOP)
        if not os.path.exists(os.path.join(build, "Makefile")):
            os.makedirs(build, exist_ok=True)
            run([os.path.join(TOP, "configure"), "-q", "--enable-python", "PYTHON=" + sys.executable,
                 "--without-cmocka", "--without-slurm", "--disable-fuzz"]
                + shlex.split(os.environ.get("AEGAEON_CONFIGURE_ARGS", "")), build)
        jobs = os.environ.get("AEGAEON_BUILD_JOBS", str(os.cpu_count() or 1))
        run(["make", "-s", "-j" + jobs, "python/aegaeon_native.la"], build)
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copyfile(os.path.join(build, "python", ".libs", "aegaeon_native.abi3.so"), out)


setup(
    version=version(),
    ext_modules=[Extension("aegaeon_native", sources=[], py_limited_api=True)],
    packages=["aegaeon_native-stubs"],
    package_dir={"aegaeon_native-stubs": "python/aegaeon_native-stubs"},
    package_data={"aegaeon_native-stubs": ["__init__.pyi", "torch.pyi"]},
    cmdclass={"build_ext": AutotoolsBuild},
    options={"bdist_wheel": {"py_limited_api": "cp310"}, "build": {"build_base": "build-wheel"}},
)
