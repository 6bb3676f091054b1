"""An app module whose own code fails at import, as one reading a setting that is not there."""

from __future__ import annotations

import os

DSN = os.environ["QTEST_NO_SUCH_SETTING"]
