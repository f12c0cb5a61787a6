"""GPU tests (skipped without CUDA). A package, so that its conftest is imported as
``gpu.conftest`` and does not replace ``tests/conftest.py`` as the module ``conftest``,
which other test modules import (``from conftest import randomize_adapters``)."""
