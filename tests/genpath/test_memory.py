import sys

import pytest

from genpath.memory import limit_heap_retention


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_limit_heap_retention_is_idempotent_on_glibc():
    first = limit_heap_retention()
    assert limit_heap_retention() == first
    assert isinstance(first, bool)
