import pytest

from conftest import bench_params, run_benchmark


@pytest.mark.parametrize("bench,case,mode,provider", bench_params("cascading_rejection"))
def test_cascading_rejection(benchmark, bench, case, mode, provider):
    run_benchmark(benchmark, bench, case, mode, provider)
