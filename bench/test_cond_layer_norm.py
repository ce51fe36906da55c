import pytest

from conftest import bench_params, run_benchmark


@pytest.mark.parametrize("bench,case,mode,provider", bench_params("cond_layer_norm"))
def test_cond_layer_norm(benchmark, bench, case, mode, provider):
    run_benchmark(benchmark, bench, case, mode, provider)
