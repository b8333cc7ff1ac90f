"""vivace's HTTP server: `vivace serve` (FastAPI + uvicorn, the `[serve]` extra) on one AsyncEngine."""
