"""Scale-out on Ray: a Ray Serve deployment (`rerankd.ray.serve`) and a Ray Data offline job
(`rerankd.ray.data`), both running the same service, engine and recipes as `rerankd serve`.

Ray is optional (`pip install "rerankd[ray]"`); nothing here is imported by the rest of
rerankd, and these modules import Ray, torch and the HTTP layer only where they need them.
"""

from __future__ import annotations

RAY_MISSING = (
    'Ray is not installed: pip install "rerankd[ray]" (or "ray[serve,data]>=2.60"), '
    "keeping the torch you have"
)


def require_ray() -> None:
    """Raise a clear error when Ray (with Serve and Data) cannot be imported."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(RAY_MISSING) from exc
