"""The tests' cache: whatever the suite computes once (relation prototypes, exports) goes to a temporary folder."""
import os
import tempfile
from pathlib import Path

from memoe_plugin.paths import cache_dir


def test_the_suite_writes_into_a_temporary_cache_never_the_users():
    here = cache_dir().resolve()
    assert here != Path("~/.cache/memoe_plugin").expanduser().resolve()
    assert here.is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert os.environ["MEMOE_CACHE"] == str(cache_dir())

