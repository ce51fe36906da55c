import pytest

from conftest import bench_params, run_benchmark


@pytest.mark.parametrize("bench,case,mode,provider", bench_params("langevin_step"))
def test_langevin_step(benchmark, bench, case, mode, provider):
    run_benchmark(benchmark, bench, case, mode, provider)
