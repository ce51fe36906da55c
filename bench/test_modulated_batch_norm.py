import pytest

from conftest import bench_params, run_benchmark


@pytest.mark.parametrize("bench,case,mode,provider", bench_params("modulated_batch_norm"))
def test_modulated_batch_norm(benchmark, bench, case, mode, provider):
    run_benchmark(benchmark, bench, case, mode, provider)
