"""Test session settings: one persistent XLA compilation cache for the whole session.

Many tests compile the same programs (the same tiny configs in several modes, and the
launcher subprocesses). The cache lives in a fresh temporary folder, so a session never reads
programs compiled by another one; subprocesses find it through the environment.
"""

import os
import tempfile

import jax

_CACHE = tempfile.mkdtemp(prefix='imputer-test-xla-cache-')
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
