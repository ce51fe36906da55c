import pytest

from conftest import bench_params, run_benchmark


@pytest.mark.parametrize("bench,case,mode,provider", bench_params("self_orthogonality"))
def test_self_orthogonality(benchmark, bench, case, mode, provider):
    run_benchmark(benchmark, bench, case, mode, provider)
