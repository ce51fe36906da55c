import pytest

from conftest import bench_params, run_benchmark


@pytest.mark.parametrize("bench,case,mode,provider", bench_params("ema_update"))
def test_ema_update(benchmark, bench, case, mode, provider):
    run_benchmark(benchmark, bench, case, mode, provider)
