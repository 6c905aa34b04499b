"""
Hypothesis strategies shared by the test suites (and the fuzz harnesses' fallbacks).
"""

from __future__ import annotations

from hypothesis import strategies as st

__all__ = ["binary_chunks", "port_names"]

#: Port names: any non-empty text.
port_names = st.text(min_size=1, max_size=20)

#: A list of binary chunks of mixed bytes-like types, empty chunks included.
binary_chunks = st.lists(
    st.one_of(
        st.binary(max_size=64),
        st.binary(max_size=64).map(bytearray),
        st.binary(max_size=64).map(memoryview),
    ),
    max_size=20,
)
