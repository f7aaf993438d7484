"""Phase drivers: how each phase's pure algorithm (``phases/``) runs on Ray.

Importing this package registers every phase of the plan with the pipeline runner; all eight
are built. A phase declared with ``pipeline.register_unbuilt`` (none today; the tests declare
one) is an error naming it and the issue that builds it, and never produces output.
"""

from coordinator.drivers import cognate  # noqa: F401 - registers phase 1
from coordinator.drivers import evomerge  # noqa: F401 - registers phase 2
from coordinator.drivers import quietstar  # noqa: F401 - registers phase 3
from coordinator.drivers import bitnet  # noqa: F401 - registers phase 4
from coordinator.drivers import forge  # noqa: F401 - registers phase 5
from coordinator.drivers import baking  # noqa: F401 - registers phase 6
from coordinator.drivers import adas  # noqa: F401 - registers phase 7
from coordinator.drivers import compress  # noqa: F401 - registers phase 8
