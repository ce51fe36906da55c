import pytest

from conftest import bench_params, run_benchmark


@pytest.mark.parametrize("bench,case,mode,provider", bench_params("orthogonal_regularizer"))
def test_orthogonal_regularizer(benchmark, bench, case, mode, provider):
    run_benchmark(benchmark, bench, case, mode, provider)
