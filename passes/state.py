"""KV-cache inputs and outputs: server-held state that stays in the permuted bases and never leaves the server.

The naming convention (past_key_values.* in, present.* out) is part of the bundle format, so it lives in
stip.runtime.bundle_format, which the runtime reads without the passes; the passes use it from here.
"""

from stip.runtime.bundle_format import expected_output, is_cache_input, is_cache_output, pair_cache

__all__ = ["expected_output", "is_cache_input", "is_cache_output", "pair_cache"]
