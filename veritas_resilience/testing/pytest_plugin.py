"""pytest plugin (registered by entry point): fixtures for real PostgreSQL and Redis topologies.

The fixtures themselves live in the private modules imported below; importing them here is what
makes pytest see them.
"""

from __future__ import annotations
