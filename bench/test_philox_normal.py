import pytest

from conftest import bench_params, run_benchmark


@pytest.mark.parametrize("bench,case,mode,provider", bench_params("philox_normal"))
def test_philox_normal(benchmark, bench, case, mode, provider):
    run_benchmark(benchmark, bench, case, mode, provider)
