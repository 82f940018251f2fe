"""What the Python test files share: the sanitizer runtimes loaded first, and a
unittest run that prints "N passed, N failed" last and removes the test's temp dir."""
import os
import shutil
import sys
import unittest


def preload_sanitizers():
    """Under --enable-sanitizers the module carries ASan, which must come first:
    runs this program again with AEGAEON_PY_PRELOAD preloaded. The interpreter's
    own allocations at exit are not leak-checked."""
    preload = os.environ.get("AEGAEON_PY_PRELOAD")
    if preload and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def run(tmp):
    """Runs the test cases of __main__, removes tmp; exits 0 when none failed."""
    try:
        suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules["__main__"])
        res = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
        failed = len(res.failures) + len(res.errors) + len(res.unexpectedSuccesses)
        print("%d passed, %d failed" % (res.testsRun - failed - len(res.skipped), failed))
        sys.stdout.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if failed == 0 else 1)
