"""Suite-wide test settings: one torch thread (tiny pipelines are overhead-bound and stall when
the two cores are shared), and ``--runslow`` to include tests marked ``slow``."""

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords or "benchmark" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def int8_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lower to the int8 GEMM layers on any CPU, as on CUDA or a VNNI CPU (where the CPU has no VNNI they
    would lower to dequant-int8; their int8 products then run ``exact_float_matmul``, still exact)."""
    from diffusion_accel.quant import lower

    monkeypatch.setattr(lower, "int8_kernels_on", lambda device: True)
