import pytest

from conftest import bench_params, run_benchmark


@pytest.mark.parametrize("bench,case,mode,provider", bench_params("spectral_norm"))
def test_spectral_norm_power_iter(benchmark, bench, case, mode, provider):
    run_benchmark(benchmark, bench, case, mode, provider)
