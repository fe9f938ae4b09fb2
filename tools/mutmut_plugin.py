"""pytest plugin loaded by the mutation pass (`[tool.mutmut] pytest_add_cli_args` in pyproject.toml).

mutmut learns which tests cover which function from one instrumented run of the tests (its "stats" run):
a test covers a function when the function's trampoline is called while the test runs. A jitted
function's Python body runs only when JAX traces it, and JAX reuses a trace for the next call with the
same shapes, so without help only the first test that traces a kernel would be recorded as covering it,
and each mutant of the kernel would run that one test. Clearing JAX's caches before every test of the
stats run makes every test trace what it calls. Mutant runs (one fresh process per mutant) need nothing.
"""

import os


def pytest_runtest_setup(item):
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        import jax

        jax.clear_caches()
