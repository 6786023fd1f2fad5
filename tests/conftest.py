import os

import pytest

import quark
from quark import _C

ISA_ORDER = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")
SUPPORTED_ISAS = ISA_ORDER[: ISA_ORDER.index(_C.detected_isa()) + 1]


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Run the test once per ISA path this CPU supports (quark.isa caps the dispatch level)."""
    with quark.isa(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _quiet_tokenizers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield
