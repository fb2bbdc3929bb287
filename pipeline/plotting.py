"""matplotlib without a display and without writing into the home folder."""
from __future__ import annotations

import os

from .job_spec import work_dir


def pyplot():
    """matplotlib.pyplot on the Agg backend; its font cache goes to the work folder, not ~/.cache."""
    os.environ.setdefault("MPLCONFIGDIR", str(work_dir() / "matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
