"""Streamlit demo page. `robustedge app [--models DIR]` runs the packaged copy
(robustedge/app/streamlit_app.py); from a checkout, `ROBUSTEDGE_MODELS=DIR streamlit run apps/demo.py` runs
the same page."""

from robustedge.app.page import render

render()
