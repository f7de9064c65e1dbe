"""Streamlit demo page (`robustedge app [--models DIR]` runs the package copy of this file; `ROBUSTEDGE_MODELS=DIR streamlit run apps/demo.py` runs this one)."""

from robustedge.app_page import render

render()
