# Shared fixtures live in tests/fixtures/, one module per concern.
pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.corpus",
    "tests.fixtures.slurm",
    "tests.fixtures.layouts",
    "tests.fixtures.mlflow_server",
    "tests.fixtures.tiny_run",
    "tests.fixtures.browser",
    "tests.fixtures.mlflow_runs",
    "tests.fixtures.tmpfs",
    "tests.fixtures.cpu_time",
]
