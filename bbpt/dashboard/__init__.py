"""``bbpt dashboard``: a read-only web view of a storage's studies (pages in :mod:`bbpt.dashboard.app`, the data
they show in :mod:`bbpt.dashboard.data`). Needs the ``ui`` extra (fastapi, uvicorn, plotly)."""
