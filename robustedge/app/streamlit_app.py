"""The script ``robustedge app`` hands to ``streamlit run`` (settings come from the environment)."""

from robustedge.app.page import render

render()
