"""The Streamlit demo: ``logic`` (testable, no Streamlit), ``page`` (the widgets) and the script
Streamlit runs, shipped inside the package so ``pip install .`` gives a working ``robustedge app``."""

from pathlib import Path

PAGE_SCRIPT = Path(__file__).with_name("streamlit_app.py")
