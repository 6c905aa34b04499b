"""
Defaults shared by the channels, the runner and the cache policy.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_HIGH_WATER_BYTES", "DEFAULT_REFERENCE_THRESHOLD_BYTES"]

#: Byte budget of a streaming edge or cache sink: a producer parks once this many bytes
#: are buffered and not yet received.
DEFAULT_HIGH_WATER_BYTES: Final = 8 * 1024 * 1024

#: Binary results at or above this size stay in the cache as refs; smaller ones are inlined.
DEFAULT_REFERENCE_THRESHOLD_BYTES: Final = 64 * 1024
