"""Make ``ptlight_apo`` importable from a source checkout before the distribution is installed.

Only the entry-point test needs the installed distribution; it skips (with the command to run)
when ``ptlight-apo`` is not installed.
"""

import sys
from pathlib import Path

PLUGIN_ROOT = str(Path(__file__).resolve().parents[1])
if PLUGIN_ROOT not in sys.path:
    sys.path.insert(0, PLUGIN_ROOT)
